"""Backfill and reconcile a project's annotations from the Label Studio API.

Webhooks are sent once, with a 1 s timeout and no retry: whatever Label Studio sent while
this backend was down, slow or restarting is gone.  :func:`sync_project` fetches every task
of the project with its annotations (``GET /api/tasks?project=ID&fields=all``, paged by task id,
only the fields we read) and brings the store level with Label Studio under the store's own rules:

- annotations Label Studio has and we lack, or hold older versions of, are upserted
  (latest ``updated_at`` wins; ids with a tombstone stay deleted);
- annotations we hold that Label Studio no longer has are deleted and tombstoned, counted.
  Only annotations that were already in the store when the sync started are candidates
  (a webhook that lands during the sync is never mistaken for a deletion), and each
  candidate is confirmed gone before it is deleted, so a page that shifted while we read
  it deletes nothing.

When it runs
    ``START_TRAINING`` (always, in a background thread); ``ls-backend sync --project KEY``;
    and when the store is found behind Label Studio.  That check is cheap: every webhook's
    project object carries Label Studio's ``total_annotations_number`` (non-cancelled
    annotations), which the store compares with its own count after each write; ``/setup``
    (sent when the backend is connected and with Label Studio's health checks) asks for the
    same number through the API at most every ``SYNC_CHECK_INTERVAL`` seconds.  A mismatch
    is confirmed against the API a few seconds later (two annotators saving at once make
    short-lived mismatches) and then a sync runs, in a background thread, never in a request.

How it reaches Label Studio
    ``LABEL_STUDIO_URL`` + ``LABEL_STUDIO_API_KEY`` (a legacy token or a personal access
    token; ``label_studio_sdk`` handles both); where they are unset, the ``hostname`` and
    ``access_token`` Label Studio sent to ``/setup`` for that project.  Tokens are never logged.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterator

from .settings import Settings
from .store import AnnotationRecord, BadEvent, CorrectionStore, EventOutcome, ProjectInfo, UnknownProject

log = logging.getLogger(__name__)

PAGE_SIZE = 500  # tasks per API page
# The task and annotation fields a sync reads.  Label Studio applies ``include`` to the nested
# annotations too, so their fields are named here as well; the rest of a task (agreement,
# annotators, drafts, predictions, ...) would double the time Label Studio takes per page.
TASK_FIELDS = "id,data,annotations,result,completed_by,was_cancelled,ground_truth,created_at,updated_at,task,project"
_NEEDED = ("id", "result", "updated_at")
BATCH = 500  # annotations per store transaction
LEASE_S = 900.0  # a background sync holds the project for at most this long
CONFIRM_ONE_BY_ONE = 100  # deletion candidates confirmed singly up to this many, else by a second listing
CHECK_DELAY_S = 5.0  # a webhook's count mismatch is confirmed this much later
RECHECK_AFTER_S = 30.0  # webhook mismatches of one project start at most one check per this many seconds

_KEY = re.compile(r"^(\d+)\.(\d+)$")


class SyncError(RuntimeError):
    """A sync could not run: no way to reach Label Studio, a refused token, a project mismatch."""


@dataclass
class SyncReport:
    project_key: str
    ls_project_id: int
    reason: str
    tasks: int = 0
    annotations: int = 0  # fetched from Label Studio (cancelled ones included)
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0
    kept_deleted: int = 0  # fetched, but deleted here earlier (tombstone): not brought back
    malformed: int = 0
    label_studio_annotations: int | None = None  # its count of non-cancelled annotations
    stored_annotations: int = 0  # ours after the sync (non-cancelled)
    seconds: float = 0.0
    finished_at: float = 0.0

    @property
    def changed(self) -> int:
        return self.inserted + self.updated + self.deleted

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        return (
            f"sync {self.project_key} ({self.reason}): {self.tasks} tasks, {self.annotations} annotations fetched; "
            f"{self.inserted} inserted, {self.updated} updated, {self.deleted} deleted, {self.unchanged} unchanged; "
            f"Label Studio {self.label_studio_annotations}, store {self.stored_annotations}; {self.seconds:.1f}s"
        )


class LabelStudioSource:
    """The few Label Studio API calls a sync needs, over ``label_studio_sdk``."""

    def __init__(self, url: str, api_key: str, timeout: float = 60.0):
        from label_studio_sdk.client import LabelStudio

        self.url = url.rstrip("/")
        self.include: str | None = TASK_FIELDS
        self.complete = False  # whether the last listing reached Label Studio's total
        try:
            self.client = LabelStudio(base_url=self.url, api_key=api_key, timeout=timeout)
        except Exception as exc:  # the SDK raises ApiError for an expired personal access token
            raise SyncError(f"Label Studio at {self.url}: the API key was refused ({_reason(exc)})") from None

    def project(self, ls_id: int) -> ProjectInfo:
        try:
            project = self.client.projects.get(id=ls_id)
        except Exception as exc:
            raise SyncError(f"Label Studio at {self.url}: project {ls_id} could not be read ({_reason(exc)})") from None
        info = ProjectInfo.from_payload(
            {
                "id": project.id,
                "created_at": project.created_at,
                "title": project.title,
                "label_config": project.label_config,
                "updated_at": getattr(project, "updated_at", None),
                "total_annotations_number": project.total_annotations_number,
            }
        )
        return replace(info, current=True)

    def tasks(self, ls_id: int, page_size: int = PAGE_SIZE) -> Iterator[tuple[int, dict, list[dict]]]:
        """``(task id, data, annotations)`` of every task, page by page, in task id order.

        Each page asks for the tasks after the last id read (a Data Manager filter on the id,
        ordered by id), never for the n-th page: tasks deleted while the listing runs (a user
        clearing a project in chunks) would move unread tasks onto pages already read, and
        their annotations would then look deleted.  A page shorter than asked for is not the
        end (Label Studio caps pages at its ``TASK_API_PAGE_SIZE_MAX`` setting): the listing
        ends on an empty page, or where Label Studio's ``total`` (the tasks left, this page
        included) says this page was the last.  Afterwards ``complete`` says whether it ended
        so (an empty page while ``total`` still counts tasks proves nothing gone).
        """
        after = 0
        self.complete = False
        while True:
            pager = self._page(ls_id, after, page_size)
            listed = pager.items or []
            if self.include and any(
                not all(name in annotation for name in _NEEDED) for task in listed for annotation in task.annotations or []
            ):
                log.info("Label Studio at %s trims annotations under include=: reading whole tasks", self.url)
                self.include = None
                continue
            total = getattr(pager.response, "total", None)
            items = sorted((task for task in listed if int(task.id) > after), key=lambda task: int(task.id))
            if listed and not items:
                raise SyncError(f"Label Studio at {self.url}: the tasks of project {ls_id} after id {after} "
                                "came back without the id filter; nothing is deleted")
            if not items:
                self.complete = not total
                return
            for task in items:
                data = task.data if isinstance(task.data, dict) else {}
                yield int(task.id), data, list(task.annotations or [])
            after = int(items[-1].id)
            if total is not None and len(listed) >= total:
                self.complete = True
                return

    def _page(self, ls_id: int, after: int, page_size: int):
        try:
            return self.client.tasks.list(
                project=ls_id, query=tasks_after(after), fields="all", include=self.include, page=1, page_size=page_size
            )
        except Exception as exc:
            raise SyncError(
                f"Label Studio at {self.url}: tasks after id {after} of project {ls_id} failed ({_reason(exc)})"
            ) from None

    def annotation_gone(self, annotation_id: int) -> bool:
        from label_studio_sdk.core.api_error import ApiError

        try:
            self.client.annotations.get(id=annotation_id)
        except Exception as exc:  # any answer but a 404 (timeouts too) stops the sync: nothing is deleted
            if isinstance(exc, ApiError) and exc.status_code == 404:
                return True
            raise SyncError(f"Label Studio at {self.url}: annotation {annotation_id}: {_reason(exc)}") from None
        return False


def tasks_after(after_id: int, *filters: dict) -> str:
    """The Data Manager query (``GET /api/tasks?query=``) for the tasks with ids above ``after_id``,
    ordered by id, that also pass ``filters``: a page by id, which deletions cannot shift."""
    id_filter = {"filter": "filter:tasks:id", "operator": "greater", "type": "Number", "value": int(after_id)}
    return json.dumps({"filters": {"conjunction": "and", "items": [*filters, id_filter]}, "ordering": ["tasks:id"]})


def _reason(exc: Exception) -> str:
    status = getattr(exc, "status_code", None)
    if status == 401:
        return "401: the API key or token was refused; legacy tokens must be enabled in Label Studio 1.23 to use them"
    if status is not None:
        body = str(getattr(exc, "body", ""))[:200]
        return f"HTTP {status}: {body}"
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def source_for(settings: Settings, store: CorrectionStore, project_key: str | None) -> LabelStudioSource:
    """Label Studio for a project: the settings first, else what ``/setup`` told us."""
    remembered_url, remembered_token = store.connection_of(project_key) if project_key else (None, None)
    url = settings.label_studio_url or remembered_url
    api_key = settings.label_studio_api_key or remembered_token
    if not url or not api_key:
        missing = " and ".join(name for name, value in (("LABEL_STUDIO_URL", url), ("LABEL_STUDIO_API_KEY", api_key))
                               if not value)
        raise SyncError(
            f"cannot reach Label Studio for project {project_key or '?'}: set {missing} "
            "(or connect this backend to the project in Label Studio, whose /setup call sends its address and token)"
        )
    return LabelStudioSource(url, api_key)


def resolve_for_sync(store: CorrectionStore, settings: Settings, key_or_id: str) -> str:
    """A project key from a key or a bare Label Studio id, asking Label Studio for ids the store lacks."""
    text = str(key_or_id).strip()
    try:
        return store.resolve_project(text)
    except UnknownProject:
        if _KEY.match(text):
            return text
        if not text.isdecimal():
            raise
    return source_for(settings, store, None).project(int(text)).key


def sync_project(
    store: CorrectionStore,
    settings: Settings,
    key_or_id: str,
    reason: str = "manual",
    source: LabelStudioSource | None = None,
) -> SyncReport:
    """Bring the store level with Label Studio for one project; see the module docstring."""
    started = time.monotonic()
    key = resolve_for_sync(store, settings, key_or_id)
    ls_id = int(key.split(".", 1)[0])
    source = source or source_for(settings, store, key)
    held_at_read = store.config_mark(key)  # a config a webhook brings while the project is read is newer
    info = replace(source.project(ls_id), held_at_read=held_at_read)
    if info.key != key:
        raise SyncError(
            f"Label Studio project {ls_id} at {source.url} has key {info.key}, not {key}: "
            "another Label Studio instance, or the project was re-created"
        )
    report = SyncReport(project_key=key, ls_project_id=ls_id, reason=reason,
                        label_studio_annotations=info.total_annotations)
    start_seq = store.global_seq()  # what the store held before we started reading
    # the label config just read is in force now: noted at once, and not again by the flushes
    # below (each would stamp it with its own clock, and a sync that runs for minutes put back
    # the old config over one a PROJECT_UPDATED webhook brought meanwhile)
    store.ingest(info, [])
    later = replace(info, current=False, updated_us=None)
    seen: set[int] = set()
    batch: list[AnnotationRecord] = []

    def flush() -> None:
        counts = store.ingest(later, batch, listed_at_seq=start_seq)
        report.inserted += counts.inserted
        report.updated += counts.updated
        report.unchanged += counts.unchanged
        report.kept_deleted += counts.tombstoned
        batch.clear()

    for task_id, data, annotations in source.tasks(ls_id):
        report.tasks += 1
        for annotation in annotations:
            report.annotations += 1
            try:
                record = AnnotationRecord.from_payload(annotation, {"id": task_id, "data": data}, ls_id)
            except BadEvent as exc:
                report.malformed += 1
                log.warning("sync %s: annotation skipped: %s", key, exc.message)
                continue
            seen.add(record.annotation_id)
            batch.append(record)
            if len(batch) >= BATCH:
                flush()
    if batch:
        flush()
    candidates = store.annotation_ids(key, up_to_seq=start_seq) - seen
    if candidates:
        gone = _confirm_gone(source, ls_id, candidates)
        report.deleted = store.delete_annotations(key, gone)
    report.stored_annotations = store.stored_annotations(key)
    report.seconds = round(time.monotonic() - started, 3)
    report.finished_at = time.time()
    store.record_sync(key, report.to_dict())
    log.info("%s", report.line())
    return report


def _confirm_gone(source: LabelStudioSource, ls_id: int, candidates: set[int]) -> set[int]:
    if len(candidates) <= CONFIRM_ONE_BY_ONE:
        return {annotation_id for annotation_id in candidates if source.annotation_gone(annotation_id)}
    still_there = {
        int(annotation["id"])
        for _task, _data, annotations in source.tasks(ls_id)
        for annotation in annotations
        if isinstance(annotation, dict) and annotation.get("id") is not None
    }
    if not getattr(source, "complete", True):
        log.warning("project %s: the second listing ended short of Label Studio's total; %d deletion candidates "
                    "are kept until a sync can confirm them", ls_id, len(candidates))
        return set()
    return candidates - still_there


def synced_outcome(report: SyncReport) -> EventOutcome:
    """What a sync changed, as the outcome of an event: what the training triggers read."""
    return EventOutcome("SYNC", report.project_key, changed=report.changed, recorded=True,
                        ls_project_id=report.ls_project_id, stored_annotations=report.stored_annotations)


class SyncScheduler:
    """Runs syncs and "behind?" checks in background threads, one at a time per project.

    Per process; across processes (gunicorn workers, machines) a lease in the store keeps
    two syncs of one project from running at once.
    """

    def __init__(self, settings: Settings, store: Callable[[], CorrectionStore],
                 on_synced: Callable[[EventOutcome], None] | None = None):
        self.settings = settings
        self._store = store
        # told of what a sync changed (as an event's outcome), so labels it brought in queue training
        # as labels from webhooks do: a backend catching up after downtime, or connected to a project
        # labeled already, would otherwise train only at the next annotation
        self._on_synced = on_synced
        self._lock = threading.Lock()
        self._busy: set[str] = set()
        self._checked: dict[str, float] = {}
        self._warned: set[str] = set()
        self.last_reports: dict[str, SyncReport] = {}

    # -- signals -------------------------------------------------------------------
    def on_event(self, outcome: EventOutcome) -> None:
        """An event listener: ``START_TRAINING`` syncs; a count mismatch schedules a check."""
        if not outcome.project_key:
            return
        if outcome.trigger:
            self.sync_soon(outcome.project_key, "START_TRAINING")
        elif outcome.behind:
            self.check_soon(
                outcome.project_key,
                f"Label Studio counts {outcome.ls_annotations} annotations, the store {outcome.stored_annotations}",
                delay=CHECK_DELAY_S,
                min_interval=RECHECK_AFTER_S,
            )

    def on_setup(self, project_key: str) -> None:
        interval = self.settings.sync_check_interval
        if interval > 0:
            self.check_soon(project_key, "setup", delay=0.0, min_interval=interval)

    # -- work ----------------------------------------------------------------------
    def sync_soon(self, project_key: str, reason: str) -> bool:
        return self._start(project_key, lambda: self._sync(project_key, reason))

    def check_soon(self, project_key: str, reason: str, delay: float, min_interval: float) -> bool:
        now = time.monotonic()
        with self._lock:
            last = self._checked.get(project_key)
            if last is not None and now - last < min_interval:
                return False
            self._checked[project_key] = now
        return self._start(project_key, lambda: self._check(project_key, reason, delay))

    def _start(self, project_key: str, work: Callable[[], None]) -> bool:
        with self._lock:
            if project_key in self._busy:
                return False
            self._busy.add(project_key)

        def run() -> None:
            try:
                work()
            except SyncError as exc:
                log.warning("project %s: %s", project_key, exc)
            except Exception:
                log.exception("project %s: background sync failed", project_key)
            finally:
                with self._lock:
                    self._busy.discard(project_key)

        threading.Thread(target=run, name=f"sync-{project_key}", daemon=True).start()
        return True

    def _check(self, project_key: str, reason: str, delay: float) -> None:
        if delay:
            time.sleep(delay)
        store = self._store()
        try:
            source = source_for(self.settings, store, project_key)
        except SyncError as exc:
            if project_key not in self._warned:
                self._warned.add(project_key)
                log.warning("project %s: cannot check whether the store is behind Label Studio: %s", project_key, exc)
            return
        ls_id = int(project_key.split(".", 1)[0])
        theirs = source.project(ls_id).total_annotations
        ours = store.stored_annotations(project_key)
        if theirs is None or theirs == ours:
            log.debug("project %s: level with Label Studio (%s annotations)", project_key, ours)
            return
        log.info("project %s: store behind Label Studio (%s vs %s; %s): syncing", project_key, ours, theirs, reason)
        self._sync(project_key, "behind Label Studio", source)

    def _sync(self, project_key: str, reason: str, source: LabelStudioSource | None = None) -> None:
        store = self._store()
        holder = store.claim_sync(project_key, LEASE_S)
        if holder is None:
            log.info("project %s: a sync is already running (another worker); %s skipped", project_key, reason)
            return
        try:
            source = source or source_for(self.settings, store, project_key)
            report = sync_project(store, self.settings, project_key, reason=reason, source=source)
            self.last_reports[project_key] = report
        finally:
            store.finish_sync(project_key, holder=holder)
        # (after START_TRAINING a job is queued already, and it syncs again before it trains)
        if self._on_synced is not None and report.changed and reason != "START_TRAINING":
            try:
                self._on_synced(synced_outcome(report))
            except Exception:
                log.exception("project %s: the labels a sync brought in could not queue training", project_key)

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Wait until no sync or check runs in this process (for tests and the CLI)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._busy:
                    return True
            time.sleep(0.05)
        return False

