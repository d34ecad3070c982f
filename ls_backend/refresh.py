"""Fresh predictions in Label Studio after every promotion, so its ordering reflects the current model.

When a version goes live, the worker that promoted it (``jobs.execute_training``) calls
:func:`refresh_predictions`: every unlabeled task of the project, in task id order and at most
``REFRESH_MAX_TASKS`` of them, is read from the Label Studio API a page at a time
(``REFRESH_PAGE_SIZE`` tasks), predicted in one batch per page (on the GPU when there is one), and
written back as one prediction per task with the new ``model_version``, through
``POST /api/projects/{id}/import/predictions`` (one bulk request per page).  The same pass keeps
each task's embedding and probabilities in the candidate pool that ``GET /projects/<key>/next``
ranks (see ``ls_backend.sampling``).

What "unlabeled" means, and what is left alone
    Label Studio's own counters decide: a task is refreshed only while it has no annotation and
    no skipped (cancelled) one (Data Manager filters ``total_annotations = 0`` and
    ``cancelled_annotations = 0``).  Labeled tasks are never written to.  A task whose text cannot
    be read gets no prediction (an empty one would sort first).

One prediction per task per version
    The pages are walked by task id (``id > cursor``, ordered by id), and before writing a page
    the tasks that already hold a prediction of the version are left out.  The cursor
    (``projects/<key>/refresh.json``) moves past a page only after its predictions and pool
    part are written, so a refresh that stops anywhere (a killed worker, Label Studio down)
    and runs again resumes after the last finished page and never writes a second prediction
    of a version to a task.  Refreshes of one project run one at a time (an flock).

Asked again for the same version: a top-up
    A refresh of the version whose refresh has finished goes on from its cursor: only tasks with
    higher ids than any it listed (imported since, or left past the ``REFRESH_MAX_TASKS`` bound)
    are predicted, at most ``REFRESH_MAX_TASKS`` more, and join the same pool.  It runs when asked
    (``ls-backend rank --refresh``, a refresh job while the version still serves) and when
    ``/next`` finds the pool used up; with nothing new it writes nothing (three API calls: the
    project twice and one listing).

Older versions' predictions are kept
    Label Studio orders by the predictions of one version (the project's ``model_version``; with
    the newer model-version dropdown, the connected backend's), so older ones do not disturb the
    order; its own "Retrieve predictions" keeps them too, and Settings > Predictions deletes a
    version in one click.  When the project's ``model_version`` names one of this backend's
    versions, the refresh moves it to the new one once every page is written: the Data Manager's
    prediction score column and uncertainty sampling then read the new scores.  Any other choice
    (the backend's title, a version of another model) is the user's and is left as it is.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from .embeddings import EmbeddingCache, encoder_id
from .labeling import CHOICES, UnsupportedConfig, plan_for
from .model import ClassifierHead, Encoder, clip_visible, resolve_device
from .ner import TokenHead
from .registry import ModelRegistry, version_prefix, write_atomic
from .sampling import NoPool, PoolPart, PoolStore, next_batch
from .settings import Settings
from .sync import tasks_after

log = logging.getLogger(__name__)

# the pool keeps each task's text up to this many characters a token of MAX_LENGTH (a token is
# rarely over 10 characters): enough for the encoder, bounded for a huge task
POOL_TEXT_CHARS_PER_TOKEN = 16
# the task fields a refresh reads (Label Studio returns predictions whole)
TASK_FIELDS = "id,data,predictions,model_version,total_annotations,cancelled_annotations"

Progress = Callable[[dict], None]


class RefreshError(RuntimeError):
    """Label Studio refused or failed a call the refresh needs (``status``: its HTTP status, if any)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass
class RefreshReport:
    project: str
    version: str | None
    state: str = "finished"  # finished | skipped
    reason: str = ""
    tasks: int = 0  # unlabeled tasks predicted for this version (a resumed run counts its earlier runs; a top-up its own)
    written: int = 0  # predictions created in Label Studio
    already_there: int = 0  # tasks that held a prediction of this version already (a resumed page)
    unreadable: int = 0  # tasks without a readable text: no prediction written
    returned: int = 0  # a top-up: tasks below where the refresh had gone, unlabeled again (a label or skip deleted)
    gone: int = 0  # tasks deleted in Label Studio while their page was predicted: no prediction written
    pooled_only: int = 0  # tasks in the pool without a prediction: no trained head reads them yet
    pages: int = 0
    resumed_after: int | None = None  # the task id this run resumed after, when it resumed
    top_up_after: int | None = None  # a top-up of a finished refresh: the task id it went on after
    bounded: bool = False  # stopped at REFRESH_MAX_TASKS with unlabeled tasks left
    label_studio_model_version: str | None = None  # the project's model_version when done
    followed: bool = False  # whether this refresh moved it to the new version
    # the version that served when the refresh ended, where it was no longer this one (a rollback or
    # a pin meanwhile): Label Studio's model_version was left alone, and that version's pool kept
    superseded_by: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


# the report's counts the cursor keeps, so that a resumed refresh goes on counting
CURSOR_COUNTS = ("tasks", "written", "already_there", "unreadable", "returned", "gone", "pooled_only", "pages")


def _field(item: Any, name: str, default: Any = None) -> Any:
    if isinstance(item, dict):
        return item.get(name, default)
    return getattr(item, name, default)


def _reason(exc: Exception) -> str:
    status = getattr(exc, "status_code", None)
    if status is not None:
        return f"HTTP {status}: {str(getattr(exc, 'body', ''))[:300]}"
    return f"{type(exc).__name__}: {str(exc)[:300]}"


class LabelStudioPredictions:
    """The Label Studio API calls of a refresh, over ``label_studio_sdk``."""

    def __init__(self, client, ls_id: int, url: str = ""):
        self.client, self.ls_id, self.url = client, ls_id, url

    def unlabeled_after(self, after_id: int, size: int, up_to: int | None = None) -> tuple[list[dict], int | None]:
        """Up to ``size`` unlabeled tasks with ids above ``after_id`` (and at most ``up_to``), by id;
        and how many are left (this page included)."""
        filters = [
            {"filter": "filter:tasks:total_annotations", "operator": "equal", "type": "Number", "value": 0},
            {"filter": "filter:tasks:cancelled_annotations", "operator": "equal", "type": "Number", "value": 0},
        ]
        if up_to is not None:
            filters.append({"filter": "filter:tasks:id", "operator": "less_or_equal", "type": "Number", "value": int(up_to)})
        query = tasks_after(after_id, *filters)
        try:
            pager = self.client.tasks.list(
                project=self.ls_id, query=query, fields="all", include=TASK_FIELDS, page=1, page_size=size
            )
        except Exception as exc:
            raise RefreshError(f"Label Studio at {self.url}: unlabeled tasks of project {self.ls_id} ({_reason(exc)})") from None
        tasks = []
        for task in pager.items or []:
            versions = {_field(p, "model_version") for p in (_field(task, "predictions") or [])}
            data = _field(task, "data")
            tasks.append({"id": int(_field(task, "id")), "data": data if isinstance(data, dict) else {}, "versions": versions})
        tasks.sort(key=lambda t: t["id"])
        return tasks, getattr(pager.response, "total", None)

    def create(self, rows: list[dict]) -> int:
        """One bulk import of predictions; the number Label Studio created."""
        if not rows:
            return 0
        from label_studio_sdk import PredictionRequest

        try:
            # never re-sent by the client: Label Studio may have committed an import its answer never
            # brought back (a proxy's 502, a dropped connection), and a second one writes every
            # prediction twice; the refresh looks at what was written before it sends again
            answer = self.client.projects.import_predictions(id=self.ls_id, request=[PredictionRequest(**row) for row in rows],
                                                             request_options={"max_retries": 0})
        except Exception as exc:
            raise RefreshError(f"Label Studio at {self.url}: importing {len(rows)} predictions ({_reason(exc)})",
                               getattr(exc, "status_code", None)) from None
        created = _field(answer, "created")
        return int(created) if created is not None else len(rows)

    def project(self) -> tuple[str, str | None, str | None]:
        """The project's key, its ``model_version`` (which predictions Label Studio orders by) and label config."""
        from .store import ProjectInfo

        try:
            project = self.client.projects.get(id=self.ls_id)
        except Exception as exc:
            raise RefreshError(f"Label Studio at {self.url}: project {self.ls_id} ({_reason(exc)})") from None
        key = ProjectInfo.from_payload({"id": project.id, "created_at": project.created_at}).key
        return key, project.model_version, project.label_config

    def set_model_version(self, version: str) -> None:
        try:
            self.client.projects.update(id=self.ls_id, model_version=version)
        except Exception as exc:
            raise RefreshError(f"Label Studio at {self.url}: setting model_version={version} ({_reason(exc)})") from None


class PredictionRefresh:
    """One refresh of one project's predictions in Label Studio, to its current version."""

    def __init__(
        self,
        settings: Settings,
        store,
        registry: ModelRegistry | None = None,
        api: LabelStudioPredictions | None = None,
        progress: Progress | None = None,
        encoder: Encoder | None = None,
    ):
        self.settings = settings
        self.store = store
        self.registry = registry or ModelRegistry(settings.model_dir)
        self.pools = PoolStore(self.registry)
        self._api = api
        self.progress = progress or (lambda update: None)
        self._encoder = encoder  # the base encoder, when the caller holds one already

    # -- state -----------------------------------------------------------------------------
    def cursor_path(self, project_key: str):
        return self.registry.project_dir(project_key) / "refresh.json"

    def cursor(self, project_key: str) -> dict:
        try:
            return json.loads(self.cursor_path(project_key).read_text())
        except (OSError, ValueError):
            return {}

    def _save_cursor(self, project_key: str, cursor: dict) -> None:
        cursor["updated_at"] = time.time()
        write_atomic(self.cursor_path(project_key), json.dumps(cursor, indent=2, sort_keys=True).encode())

    def _exclusive(self, project_key: str):
        return self.registry.lock(project_key, ".refresh.lock")

    def api_for(self, project_key: str) -> LabelStudioPredictions:
        if self._api is None:
            from .sync import source_for

            source = source_for(self.settings, self.store, project_key)
            self._api = LabelStudioPredictions(source.client, int(project_key.split(".", 1)[0]), source.url)
        return self._api

    # -- the refresh -----------------------------------------------------------------------
    def run(self, project_key: str) -> RefreshReport:
        started = time.monotonic()
        with self._exclusive(project_key):
            report = self._run(project_key)
        report.seconds = round(time.monotonic() - started, 3)
        log.info(
            "project %s: refresh of %s %s: %d tasks, %d predictions written, %d already there%s",
            project_key, report.version, report.state, report.tasks, report.written, report.already_there,
            f" ({report.reason})" if report.reason else "",
        )
        return report

    def _run(self, project_key: str) -> RefreshReport:
        limit = self.settings.refresh_max_tasks
        if limit <= 0:
            return RefreshReport(project_key, None, "skipped", "REFRESH_MAX_TASKS=0")
        cursor = self.cursor(project_key)
        api = self.api_for(project_key)
        ls_key, chosen, ls_config = api.project()
        if ls_key != project_key:
            raise RefreshError(
                f"Label Studio project {api.ls_id} at {api.url} has key {ls_key}, not {project_key}: "
                "another Label Studio instance, or the project was re-created"
            )
        # the version /setup and /predict answer for the label config in force (Label Studio's own,
        # else the store's): what serves (or stands in for a missing or unreadable current version),
        # re-shaped where the config changed since it was made, a cold start for a project without
        # any version or after BASE_MODEL changed, exactly as a web worker decides it.  Predictions of
        # a version made for an earlier config name controls Label Studio no longer has (it drops them
        # and answers 201), and a version /setup no longer answers would sort nothing.
        held = self.registry.readable_current(project_key)
        config = (ls_config or (self.store.latest_label_config(project_key) if self.store is not None else None)
                  or (held.meta.get("label_config") if held is not None else None))
        if not config:
            return RefreshReport(project_key, held.version if held else None, "skipped",
                                 "no version yet, and no label config we can serve")
        try:
            plan = plan_for(config)
        except UnsupportedConfig as exc:
            return RefreshReport(project_key, held.version if held else None, "skipped", f"label config: {exc}")
        from .predictor import Serving

        predictor = self._predictor()
        serving = predictor.ensure_serving(project_key, plan)
        loaded = self.registry.load(project_key, serving.version)
        renumbered = self._past_another_install(project_key, api, loaded, chosen)
        if renumbered.version != loaded.version:
            loaded = renumbered
            serving = Serving(loaded.version, loaded.heads, serving.encoder, loaded.meta.get("plan_signature"))
        version = loaded.version
        primary = next(
            (c for c in plan.controls if c.kind == CHOICES and isinstance(loaded.heads.get(c.name), ClassifierHead)), None
        )
        embed_control = primary or (plan.controls[0] if plan.controls else None)
        report = RefreshReport(project_key, version)
        if cursor.get("version") == version and cursor.get("state") == "running":
            report.resumed_after = int(cursor.get("after_id", 0))
            report.top_up_after = cursor.get("top_up_after")
            for name in CURSOR_COUNTS:
                setattr(report, name, int(cursor.get(name, 0)))
            # what the last page read said (a run killed after its last page, resumed, reads none)
            report.bounded = bool(cursor.get("bounded", False))
        elif cursor.get("version") == version and cursor.get("state") == "finished" and self.pools.exists(
            project_key, version
        ):
            report.top_up_after = int(cursor.get("after_id", 0))
            # what this version's earlier runs wrote to Label Studio, or found there
            before = sum(int(cursor.get(name, 0)) for name in ("predicted_before", "written", "already_there"))
            cursor = {"version": version, "state": "running", "after_id": report.top_up_after,
                      "top_up_after": report.top_up_after, "predicted_before": before,
                      "follow_pending": bool(cursor.get("follow_pending")), "started_at": time.time()}
            self._save_cursor(project_key, cursor)
        else:
            head = loaded.heads.get(primary.name) if primary else None
            # what the ranking reads was trained: the classification head, or (no Choices) an entity head
            trained = any(
                (isinstance(h, ClassifierHead) if primary else isinstance(h, TokenHead)) and h.trained
                for h in loaded.heads.values()
            )
            self.pools.start(project_key, version, {
                "control": primary.name if primary else None,
                "labels": list(head.labels) if head else [],
                "multiple": bool(head.multiple) if head else False,
                "threshold": float(head.threshold) if head else 0.5,
                "trained": trained,
                "score_mode": self.settings.score_mode,
                # what the embeddings were made with: a job self-trains on them only when it embeds alike
                "encoder": encoder_id(loaded.meta, self.settings.encoder_path, serving.encoder),
            })
            cursor = {"version": version, "state": "running", "after_id": 0, "started_at": time.time()}
            self._save_cursor(project_key, cursor)
        if report.top_up_after is not None:
            self._returned(project_key, version, plan, predictor, serving, embed_control, primary, report, limit, cursor)
        after_id = int(cursor.get("after_id", 0))
        while report.tasks < limit and not self._superseded(project_key, version):
            size = min(self.settings.refresh_page_size, limit - report.tasks)
            tasks, left = api.unlabeled_after(after_id, size)
            if not tasks:
                break
            self._page(project_key, version, plan, predictor, serving, embed_control, primary, tasks, report)
            after_id = tasks[-1]["id"]
            report.pages += 1
            remaining = (left or 0) - len(tasks)
            report.bounded = remaining > 0 and report.tasks >= limit
            cursor.update(after_id=after_id, bounded=report.bounded, **{name: getattr(report, name) for name in CURSOR_COUNTS})
            self._save_cursor(project_key, cursor)
            steps = report.tasks + min(max(remaining, 0), limit - report.tasks)
            self.progress({"stage": "refresh", "version": version, "step": report.tasks, "steps": steps,
                           "written": report.written})
        self._labeled_part(project_key, version, loaded, serving, embed_control)
        # Label Studio's model_version moves last; until it has, the next job runs a top-up that tries again
        cursor.update(state="finished", bounded=report.bounded, finished_at=time.time(), follow_pending=True)
        self._save_cursor(project_key, cursor)
        # a rollback or a pin while this ran: the version it refreshed serves no more, so Label Studio is not
        # moved to it, and the pool of the version that serves now is kept (the rollback queued its refresh)
        served = self.registry.served_version(project_key)
        if served != version:
            report.superseded_by = served
            log.warning("project %s: %s no longer serves (%s does: a rollback or a pin while the refresh ran); "
                        "Label Studio's model_version left as it was", project_key, version, served)
        self.pools.finish(project_key, version, report.to_dict(), keep=served)
        if served == version and self._follow(project_key, version, api, report, int(cursor.get("predicted_before", 0))):
            cursor.update(follow_pending=False)
            self._save_cursor(project_key, cursor)
        return report

    def _returned(self, project_key, version, plan, predictor, serving, embed_control, primary, report, limit, cursor) -> None:
        """A top-up's first part: the unlabeled tasks at or below where the refresh had gone that the
        pool does not hold, unlabeled again since (an annotation or a skip deleted in Label Studio).
        Pool members, and tasks a run of this version found no text in, are passed over (a top-up
        cut short and run again predicts none twice; a task whose text was mended is read again at
        the next version's refresh)."""
        pool = self.pools.load(project_key, version)
        passed = set(pool.task_ids.tolist()) if pool is not None else set()
        passed |= self.pools.unreadable(project_key, version)
        pooled = dict(zip(pool.task_ids.tolist(), pool.texts)) if pool is not None and pool.texts is not None else {}
        api, after_id = self.api_for(project_key), 0
        while report.tasks < limit and not self._superseded(project_key, version):
            tasks, _ = api.unlabeled_after(after_id, self.settings.refresh_page_size, up_to=report.top_up_after)
            if not tasks:
                break
            after_id = tasks[-1]["id"]
            fresh = [task for task in tasks if task["id"] not in passed
                     or self._another_task(task, pooled.get(task["id"]), embed_control)][: limit - report.tasks]
            if fresh:
                report.returned += self._page(project_key, version, plan, predictor, serving, embed_control, primary,
                                              fresh, report)
                report.pages += 1
                passed.update(task["id"] for task in fresh)
                cursor.update(**{name: getattr(report, name) for name in CURSOR_COUNTS})
                self._save_cursor(project_key, cursor)

    def _superseded(self, project_key: str, version: str) -> bool:
        """Whether another version serves now (the other lane promoted one, or an operator rolled
        back): the pages left are not worth predicting with ``version``, which Label Studio will not
        show; the refresh of the version that serves (queued with it) writes them."""
        served = self.registry.served_version(project_key)
        if served == version:
            return False
        log.info("project %s: %s serves now; the refresh of %s stops at this page", project_key, served, version)
        return True

    def _past_another_install(self, project_key: str, api: LabelStudioPredictions, loaded, chosen: str | None):
        """Where Label Studio holds predictions under names of ours that this registry never gave
        (another install of the backend, or this one before its ``MODEL_DIR`` was lost: names start
        again at v0), and the served version's name or the next ones are among them, the served
        version is written again under a name past all of them.  Else the refresh took their
        predictions for its own ("already there"), and Label Studio went on showing another
        model's suggestions and scores under the name.  Looks at the project's chosen version and
        the first page of unlabeled tasks; names below the ones given here are left alone."""
        ours = re.compile(re.escape(version_prefix(project_key)) + r"-v(\d+)")
        first, _ = api.unlabeled_after(0, self.settings.refresh_page_size)
        names = {chosen}.union(*(task["versions"] for task in first))
        given = self.registry.given(project_key)
        foreign = {name: int(match[1]) for name in names
                   if name and name not in given and (match := ours.fullmatch(name))}
        serving = ours.fullmatch(loaded.version)
        if not foreign or (serving is not None and max(foreign.values()) < int(serving[1])):
            return loaded
        top = max(foreign.values())
        reason = (f"Label Studio holds predictions of {', '.join(sorted(foreign, key=foreign.get)[-5:])}, "
                  "which this MODEL_DIR never made (another install of the backend)")
        name = self.registry.renumber_past(project_key, loaded.version, top, reason)
        log.warning("project %s: %s; %s is served as %s from now on", project_key, reason, loaded.version, name)
        return self.registry.load(project_key, name)

    def _labeled_part(self, project_key: str, version: str, loaded, serving, control) -> None:
        """Beside the pool, the embeddings of the tasks labeled now (the ``typical`` strategy counts
        their regions as covered).  The jobs embedded these texts with the same weights, so they
        are read from this machine's embedding cache, or encoded where they are not there."""
        if control is None or self.store is None:
            return
        try:
            labeled = [(task_id, text) for task_id, text, _ in
                       self.store.annotation_results(project_key, control.name, include_empty=True) if text]
            if not labeled:
                return
            vectors, _ = EmbeddingCache(self.settings.local_cache_dir).encode(
                serving.encoder, encoder_id(loaded.meta, self.settings.encoder_path, serving.encoder),
                [text for _, text in labeled], self.settings.batch_size,
            )
        except Exception:  # the pool serves every other strategy without it; "typical" then sees no labels
            log.warning("project %s: the labeled tasks' embeddings were not kept", project_key, exc_info=True)
            return
        self.pools.add_labeled(project_key, version, [task_id for task_id, _ in labeled], vectors)

    def _base_encoder(self) -> Encoder:
        if self._encoder is None:
            self._encoder = Encoder(
                self.settings.encoder_path,
                resolve_device(self.settings.device),
                self.settings.max_length,
                self.settings.inference_precision,
            )
        return self._encoder

    def _another_task(self, task: dict, pooled: str | None, control) -> bool:
        """Whether ``task`` is not the task the pool holds under its id: Label Studio on SQLite gives
        imported tasks the ids after the newest one there, so tasks deleted and imported again come
        back under the same ids, with other texts and no prediction of the version."""
        if pooled is None or control is None:
            return False
        from .predictor import read_text

        read = read_text(task, control.field)
        if read.text is None:
            return True
        return self._pool_text(clip_visible(read.text, self.settings.max_text_chars, whole_words=True)) != pooled

    def _pool_text(self, text: str) -> str:
        """What the pool keeps of a text a prediction read: a job re-embeds it with the encoder it
        tunes, which reads MAX_LENGTH tokens at most."""
        return text[: POOL_TEXT_CHARS_PER_TOKEN * self.settings.max_length]

    def _predictor(self):
        from .predictor import Predictor

        return Predictor(self.settings, self.registry, encoder=self._base_encoder())

    def _page(self, project_key, version, plan, predictor, serving, embed_control, primary, tasks, report) -> int:
        """Predict ``tasks``, write what is new to Label Studio and add them to the pool; how many
        joined the pool."""
        keep: dict = {}
        results = predictor.predict_with(serving, plan, tasks, project_key, keep=keep)
        rows, ids, rows_of_embedding, probabilities, scores, unreadable = [], [], [], [], [], []
        for i, (task, result) in enumerate(zip(tasks, results)):
            slot = keep["slot"].get((embed_control.field, i)) if embed_control is not None else None
            if slot is None and not keep["scored"][i]:
                # no text to read; a text with nothing found (no entity) still has its score
                report.unreadable += 1
                unreadable.append(task["id"])
                continue
            if slot is not None:  # the pool reads the first control's text; another control's may be all there is
                ids.append(task["id"])
                rows_of_embedding.append(slot)
                scores.append(result["score"])
                if primary is not None:
                    row = keep["probabilities"][primary.name][i]
                    if row is None:  # not finite (a half-precision overflow): kept as such, /next ranks it first
                        row = np.full(len(serving.heads[primary.name].labels), np.nan, dtype=np.float32)
                    probabilities.append(row)
            if not keep["scored"][i]:  # nothing trained reads it yet (an untrained entity head): pool only
                report.pooled_only += 1
                continue
            if version in task["versions"]:
                report.already_there += 1
                continue
            rows.append({"task": task["id"], "result": result["result"], "score": result["score"], "model_version": version})
        gone = self._create(project_key, rows, report)
        if gone:
            keep_rows = [k for k, task_id in enumerate(ids) if task_id not in gone]
            ids = [ids[k] for k in keep_rows]
            rows_of_embedding = [rows_of_embedding[k] for k in keep_rows]
            scores = [scores[k] for k in keep_rows]
            probabilities = [probabilities[k] for k in keep_rows] if primary is not None else probabilities
        report.tasks += len(tasks)
        self.pools.add(project_key, version, PoolPart(
            task_ids=ids,
            embeddings=keep["embeddings"][rows_of_embedding] if ids else np.zeros((0, 0), dtype=np.float32),
            probabilities=np.asarray(probabilities, dtype=np.float32) if primary is not None and ids else None,
            scores=scores,
            texts=[self._pool_text(keep["texts"][row]) for row in rows_of_embedding],
        ))
        self.pools.add_unreadable(project_key, version, unreadable)
        return len(ids)

    def _create(self, project_key: str, rows: list[dict], report: RefreshReport) -> set[int]:
        """Import ``rows``; the tasks among them that Label Studio no longer has (or no longer lists
        unlabeled).  Label Studio refuses a whole import (400) for one task deleted since its page
        was listed: the page is listed again, and the rows of the tasks still listed are sent at
        once; where that changes nothing (or is refused too), the rows are sent one by one, and the
        refused ones are taken as gone.  Where every one is refused, they are gone only if Label
        Studio no longer lists them (else the rows are at fault: raised)."""
        api = self.api_for(project_key)
        try:
            try:
                report.written += self._created(project_key, rows, api.create(rows))
            except RefreshError as exc:
                if not rows or not _maybe_committed(exc):
                    raise
                rows = self._unwritten(project_key, rows)  # what Label Studio holds now decides what to send again
                log.warning("project %s: importing predictions failed (%s); sending the %d not written again",
                            project_key, exc, len(rows))
                report.written += self._created(project_key, rows, api.create(rows)) if rows else 0
            return set()
        except RefreshError as exc:
            if exc.status != 400 or not rows:
                raise
            refused, written = set(), 0
            if len(rows) > 1:
                # one task deleted since the page was listed refuses the whole import: list the page
                # again and send the rows of the tasks still there at once (each import call makes
                # Label Studio recount every task of the project: row by row, one recount per row)
                still = self._listed(project_key, rows)
                left = [row for row in rows if int(row["task"]) in still]
                if len(left) < len(rows):
                    try:
                        written = self._created(project_key, left, api.create(left)) if left else 0
                        refused, rows = {int(row["task"]) for row in rows} - still.keys(), []
                    except RefreshError as again:  # refused too: row by row, below
                        if again.status != 400:
                            raise
            for row in rows if len(rows) > 1 else []:
                try:
                    written += api.create([row])
                except RefreshError as one:
                    if one.status != 400:
                        raise
                    refused.add(int(row["task"]))
            if len(rows) == 1 or (rows and len(refused) == len(rows)):
                refused = {int(row["task"]) for row in rows}
                if refused & self._listed(project_key, rows).keys():
                    raise exc
            report.written += written
            report.gone += len(refused)
            log.warning("project %s: tasks %s are no longer in Label Studio, or labeled since (%s); no prediction "
                        "written for them",
                        project_key, sorted(refused)[:20], exc)
            return refused

    @staticmethod
    def _created(project_key: str, rows: list[dict], created: int) -> int:
        if created < len(rows):  # Label Studio 1.23 skips a prediction it finds invalid, and answers 201
            log.warning("project %s: Label Studio created %d of %d predictions (the others did not fit its label "
                        "config)", project_key, created, len(rows))
        return created

    def _listed(self, project_key: str, rows: list[dict]) -> dict[int, dict]:
        """The tasks of ``rows`` that Label Studio lists unlabeled now, by id (one listing of the
        stretch of ids they span)."""
        ids = [int(row["task"]) for row in rows]
        listed, _ = self.api_for(project_key).unlabeled_after(
            min(ids) - 1, 2 * max(len(rows), self.settings.refresh_page_size), up_to=max(ids))
        return {task["id"]: task for task in listed}

    def _unwritten(self, project_key: str, rows: list[dict]) -> list[dict]:
        """Of ``rows``, those whose task Label Studio still lists unlabeled without a prediction of the
        row's version (an import whose answer was lost may have been written)."""
        version = rows[0]["model_version"]
        listed = self._listed(project_key, rows)
        return [row for row in rows if int(row["task"]) in listed
                and version not in listed[int(row["task"])]["versions"]]

    def _follow(self, project_key: str, version: str, api: LabelStudioPredictions, report: RefreshReport,
                predicted_before: int = 0) -> bool:
        """Move the project's ``model_version`` to ``version`` when it names another of our versions
        and Label Studio holds predictions of ``version`` (this run's, or an earlier run's:
        ``predicted_before``); False where Label Studio could not be asked or told."""
        try:
            _, chosen, _ = api.project()
            ours = re.fullmatch(re.escape(version_prefix(project_key)) + r"-v\d+", chosen or "")
            if ours and chosen != version and report.written + report.already_there + predicted_before > 0:
                api.set_model_version(version)
                chosen, report.followed = version, True
            report.label_studio_model_version = chosen
            return True
        except RefreshError as exc:
            log.warning("project %s: could not move Label Studio's model_version to %s: %s", project_key, version, exc)
            return False


def _maybe_committed(exc: RefreshError) -> bool:
    """Whether a failed import may still have been written: no answer (a dropped connection, a
    timeout) or a server error (a proxy's 502 after Label Studio committed)."""
    return exc.status is None or exc.status >= 500 or exc.status in (408, 429)


def unfinished_refresh(settings: Settings, project_key: str) -> str | None:
    """The served version, when its refresh started and did not finish (its job was killed by
    JOB_TIMEOUT or a crash, or Label Studio failed mid-way), or when Label Studio's model_version
    was not moved to it at the end: the next job of the project resumes it, so a retried job whose
    labels did not change still completes what was cut short."""
    registry = ModelRegistry(settings.model_dir)
    cursor = PredictionRefresh(settings, None, registry=registry).cursor(project_key)
    current = registry.served_version(project_key)
    if current is not None and cursor.get("version") == current and (
        cursor.get("state") == "running" or cursor.get("follow_pending")
    ):
        return current
    return None


def refresh_predictions(settings: Settings, store, project_key: str, progress: Progress | None = None,
                        raise_errors: bool = False) -> dict:
    """Refresh a project's predictions in Label Studio (what the worker runs after a promotion).

    A failure is reported, not raised, unless ``raise_errors`` (a refresh-only job, which the
    queue then retries; it resumes where it stopped)."""
    from .sync import SyncError

    try:
        return PredictionRefresh(settings, store, progress=progress).run(project_key).to_dict()
    except SyncError as exc:  # no way to reach Label Studio for this project
        if raise_errors:
            raise
        log.warning("project %s: predictions not refreshed: %s", project_key, exc)
        return {"project": project_key, "state": "skipped", "reason": str(exc)}
    except Exception as exc:
        if raise_errors:
            raise
        log.exception("project %s: refresh of predictions failed; it resumes on the next refresh", project_key)
        return {"project": project_key, "state": "failed", "reason": f"{type(exc).__name__}: {exc}"}


def rank_project(settings: Settings, store, project_key: str, n: int, strategy: str | None = None,
                 refresh: bool = False, seed: int | None = None) -> dict:
    """``ls-backend rank``: the next batch, refreshing first (in this process) when asked, when
    there is no pool yet, or when the pool is not the current version's complete one."""
    registry = ModelRegistry(settings.model_dir)
    body: dict = {}
    try:
        batch = None if refresh else next_batch(settings, registry, store, project_key, n, strategy, seed)
    except NoPool:
        batch = None
    if batch is None or batch.stale:
        from .sync import SyncError

        try:
            report = PredictionRefresh(settings, store, registry).run(project_key)
            body["refresh"] = report.to_dict()
        except (RefreshError, SyncError) as exc:
            # Label Studio out of reach: a pool there is still ranked, stale (as GET /next ranks it);
            # without one, or with --refresh asked for, the reason is the answer
            if refresh or PoolStore(registry).best(project_key, registry.served_version(project_key)) is None:
                raise
            log.warning("project %s: refresh before ranking failed (%s); ranking the pool there is", project_key, exc)
            body["refresh"] = {"state": "failed", "reason": str(exc)}
        batch = next_batch(settings, registry, store, project_key, n, strategy, seed)
    return dict(batch.to_dict(), **body)
