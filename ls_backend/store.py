"""The corrections store: every human label Label Studio tells us about, kept durably.

One :class:`CorrectionStore` per process.  It holds, per project (keyed ``"<id>.<created_ts>"``):

``annotations``
    the live annotations, one row per Label Studio annotation id: task id, task data, result,
    annotator, ``was_cancelled``, ``ground_truth``, ``updated_at`` (as integer microseconds),
    the label config snapshot it arrived with, and ``seq``, the change sequence number of
    its last change.
``tombstones``
    annotation ids deleted in Label Studio, with their task and the last ``updated_at`` held.  A
    late replay of the created/updated event for that id is ignored.  Label Studio on SQLite (its
    default) gives imported annotations the ids after the newest one there, so once the newest
    annotation is deleted the next import reuses its id: a record under a buried id that is on
    another task, or was made after the deleted annotation's last change (Label Studio's clock
    on both sides), is a new annotation, and is stored.
``label_configs``
    every label config a project has had, by hash; ``projects.label_config_id`` points at
    the current one.
``projects``
    Label Studio id, title, last event time, counters, the training mark (``trained_seq``),
    what ``/setup`` told us (Label Studio's address and the owner's token, for catching up),
    and the last sync report.
``deleted_tasks``
    task ids ``TASKS_DELETED`` named, when (the last time, this machine's clock), and the newest
    ``updated_at`` of the labels held on the task then (Label Studio's clock); an annotation event
    for such a task is ignored, unless the annotation was made after that label or after the
    deletion: Label Studio on SQLite gives the next task the id of the last one deleted, and that
    new task's labels count, whichever clock runs ahead.
``task_changes``
    per task, the seq of its last training-relevant change; ``projects.pending_tasks`` keeps
    the number of tasks changed since the last training run.
``triggers``
    ``START_TRAINING`` requests as received.

Writes
    Every write is one transaction that first takes the next value of a store-wide counter
    (``store_meta.seq``).  Taking it locks the counter row (PostgreSQL) or the database
    (SQLite ``BEGIN IMMEDIATE``), so writers are serialised, ``seq`` grows in commit order,
    and the read-compare-write of an upsert never races another process.  Transactions
    last milliseconds.  Webhooks that arrive together in one process share a transaction
    (group commit, :class:`_GroupCommit`), and a transaction touches each project once
    (:class:`_ProjectWork`): a burst costs a few statements and one disk flush per batch.
    ``record_event`` returns only after the commit that holds its event.

Conflict rule (the same for webhooks and sync)
    An annotation version is ordered by ``(updated_at, content hash)``; the larger wins, so
    replayed, duplicated and reordered events end in the same state.  A delete wins over
    everything (tombstone).  A label config change is ordered by the project's
    ``updated_at`` the same way.

Training view (:meth:`CorrectionStore.training_examples`)
    One example per task and control, from the task's non-cancelled annotations that hold a
    choice for the control (labels no longer in the control dropped, with a log line):
    the latest ground-truth annotation if there is one; otherwise one vote per annotator
    (their latest annotation), the label set with most votes; a tie goes to the latest
    annotation (``updated_at``, then annotation id).

SQLite (``MODEL_DIR/store.sqlite``) runs in WAL mode with a busy timeout, safe for several
worker processes on one machine.  Several machines need PostgreSQL (``DATABASE_URL``).
The schema is migrated by the ordered functions in ``MIGRATIONS``, recorded in
``schema_version``; nothing is ever dropped and recreated.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import cached_property
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from .labeling import CHOICES, LABELS, ControlSpec, UnsupportedConfig, field_value, plan_for
from .spans import region_labels
from .text import utf8_safe

log = logging.getLogger(__name__)

SQLITE_NAME = "store.sqlite"
BUSY_TIMEOUT_MS = 30_000
MIGRATION_LOCK = 7_301_117  # pg_advisory_xact_lock key: one migrating process at a time

ANNOTATION_CREATED = "ANNOTATION_CREATED"
ANNOTATIONS_CREATED = "ANNOTATIONS_CREATED"
ANNOTATION_UPDATED = "ANNOTATION_UPDATED"
ANNOTATIONS_DELETED = "ANNOTATIONS_DELETED"
TASKS_DELETED = "TASKS_DELETED"
PROJECT_UPDATED = "PROJECT_UPDATED"
START_TRAINING = "START_TRAINING"
HANDLED_ACTIONS = (
    ANNOTATION_CREATED,
    ANNOTATIONS_CREATED,
    ANNOTATION_UPDATED,
    ANNOTATIONS_DELETED,
    TASKS_DELETED,
    PROJECT_UPDATED,
    START_TRAINING,
)


class StoreError(RuntimeError):
    """The store cannot be opened or used (bad URL, schema newer than this code, ...)."""


class BadEvent(ValueError):
    """A webhook payload we cannot record; the message says what is wrong."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class UnknownProject(LookupError):
    """No such project in the store, or a bare id that names several."""

    def __init__(self, message: str, ambiguous: bool = False):
        super().__init__(message)
        self.message = message
        self.ambiguous = ambiguous  # a bare id that names several projects: the request's to fix (400), not a 404

    def __str__(self) -> str:
        return self.message


# -- what goes in ----------------------------------------------------------------------
def canonical_json(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800", valid JSON): kept, \u-escaped, as UTF-8 cannot hold it
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return text


def storable(text: str) -> str:
    """``text`` as a SQLite and PostgreSQL text column can hold it: a lone surrogate becomes "?",
    a NUL character U+FFFD (PostgreSQL refuses NUL in text)."""
    return utf8_safe(text).replace("\x00", "\ufffd")


def parse_time(value: Any) -> datetime | None:
    """An ISO-8601 string (``Z`` or offset; naive means UTC) or a datetime, as an aware datetime."""
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str) and value.strip():
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            return None
    else:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def micros(moment: datetime) -> int:
    delta = moment - datetime(1970, 1, 1, tzinfo=timezone.utc)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def project_key(project_id: int, created_at: Any) -> str:
    """Label Studio's project key: ``f"{id}.{int(created_at.timestamp())}"``."""
    moment = parse_time(created_at)
    if moment is None:
        raise BadEvent(f"project 'created_at' {created_at!r} is not an ISO-8601 time")
    return f"{project_id}.{int(moment.timestamp())}"


def _int_id(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise BadEvent(f"{what} must be an integer id, not {type(value).__name__}")
    try:
        number = int(value)
    except ValueError:
        raise BadEvent(f"{what} must be an integer id, not {value!r}") from None
    if number < 0 or number >= 2**63:
        raise BadEvent(f"{what} {number} is out of range")
    return number


def _flag(annotation: dict, name: str, annotation_id: int) -> bool:
    """A true/false field of an annotation: a JSON boolean (or missing or null: false); the text
    "true" or "false" as well.  Anything else is refused, rather than read as true ("false" is a
    non-empty string) and the label dropped from training."""
    value = annotation.get(name)
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise BadEvent(f"annotation {annotation_id}: {name!r} must be true or false, not {str(value)[:40]!r}")


def _annotator(value: Any) -> str:
    if isinstance(value, dict):
        value = value.get("id", value.get("email"))
    return "" if value is None else storable(str(value))


@dataclass(frozen=True)
class ProjectInfo:
    """The project object Label Studio sends with every webhook (or returns from its API)."""

    key: str
    ls_id: int
    title: str = ""
    created_at: str = ""
    label_config: str | None = None
    updated_us: int | None = None
    total_annotations: int | None = None  # Label Studio's count of non-cancelled annotations
    current: bool = False  # read from the API just now: its label config is the one in force
    # with ``current``: the store's label config mark (``CorrectionStore.config_mark``) taken before
    # the read; a config a webhook brought after that is newer than the read and stays
    held_at_read: tuple | None = None

    @classmethod
    def from_payload(cls, project: Any) -> "ProjectInfo":
        if not isinstance(project, dict):
            raise BadEvent("the payload names no project: a 'project' object with 'id' and 'created_at' is expected")
        if project.get("id") is None or not project.get("created_at"):
            raise BadEvent("the 'project' object needs 'id' and 'created_at' (the project key is built from them)")
        ls_id = _int_id(project["id"], "project.id")
        created = project["created_at"]
        key = project_key(ls_id, created)
        config = project.get("label_config")
        if config is not None and not isinstance(config, str):
            raise BadEvent("project.label_config must be a string holding the label config XML")
        updated = parse_time(project.get("updated_at"))
        total = project.get("total_annotations_number")
        return cls(
            key=key,
            ls_id=ls_id,
            title=storable(str(project.get("title") or "")),
            # as sent, for the operator view (the key is built from the parsed time); a column of 64
            # characters holds any real one (PostgreSQL refuses a longer string, where SQLite keeps it)
            created_at=storable(created if isinstance(created, str) else str(created))[:64],
            label_config=storable(config) if config else None,
            updated_us=micros(updated) if updated else None,
            total_annotations=total if isinstance(total, int) and not isinstance(total, bool) and 0 <= total < 2**63 else None,
        )


@dataclass(frozen=True)
class AnnotationRecord:
    """One annotation version, normalised from a webhook or from the Label Studio API."""

    annotation_id: int
    task_id: int
    task_data: dict
    result: list
    annotator: str
    was_cancelled: bool
    ground_truth: bool
    updated_us: int
    created_us: int | None = None  # when Label Studio made the annotation, where it says

    @classmethod
    def from_payload(cls, annotation: Any, task: Any, ls_project_id: int | None = None) -> "AnnotationRecord":
        if not isinstance(annotation, dict):
            raise BadEvent("'annotation' must be an object")
        if annotation.get("id") is None:
            raise BadEvent("annotation.id is missing")
        annotation_id = _int_id(annotation["id"], "annotation.id")
        if ls_project_id is not None and annotation.get("project") is not None:
            if _int_id(annotation["project"], "annotation.project") != ls_project_id:
                raise BadEvent(f"annotation {annotation_id} belongs to project {annotation['project']}, "
                               f"not to the project {ls_project_id} sent with it")
        task_ref = annotation.get("task")
        if isinstance(task_ref, dict):
            task_ref = task_ref.get("id")
        if not isinstance(task, dict):
            raise BadEvent(f"annotation {annotation_id}: the 'task' object (with its data) is missing")
        if task.get("id") is None and task_ref is None:
            raise BadEvent(f"annotation {annotation_id}: no task id")
        task_id = _int_id(task.get("id", task_ref), "task.id")
        if task_ref is not None and _int_id(task_ref, "annotation.task") != task_id:
            raise BadEvent(f"annotation {annotation_id} is on task {task_ref}, but task {task_id} was sent")
        data = task.get("data")
        if not isinstance(data, dict):
            raise BadEvent(f"task {task_id}: 'data' must be an object")
        result = annotation.get("result")
        if result is None:
            result = []
        if not isinstance(result, list) or not all(isinstance(item, dict) for item in result):
            raise BadEvent(f"annotation {annotation_id}: 'result' must be a list of objects")
        stamp = parse_time(annotation.get("updated_at")) or parse_time(annotation.get("created_at"))
        if stamp is None:
            raise BadEvent(f"annotation {annotation_id}: 'updated_at' is missing or not an ISO-8601 time")
        return cls(
            annotation_id=annotation_id,
            task_id=task_id,
            task_data=data,
            result=result,
            annotator=_annotator(annotation.get("completed_by")),
            was_cancelled=_flag(annotation, "was_cancelled", annotation_id),
            ground_truth=_flag(annotation, "ground_truth", annotation_id),
            updated_us=micros(stamp),
            created_us=micros(made) if (made := parse_time(annotation.get("created_at"))) else None,
        )

    @cached_property
    def content_hash(self) -> str:
        """What makes two versions the same label (task data aside: it is not part of the label)."""
        return label_hash(self.task_id, self.result, self.annotator, self.was_cancelled, self.ground_truth)


def label_hash(task_id: int, result: Any, annotator: str, was_cancelled: bool, ground_truth: bool) -> str:
    """An annotation version's ``content_hash``."""
    body = canonical_json([task_id, result, annotator, was_cancelled, ground_truth])
    return hashlib.sha256(body.encode()).hexdigest()


@dataclass
class ParsedEvent:
    action: str
    project: ProjectInfo | None = None
    records: list[AnnotationRecord] = field(default_factory=list)
    deleted_ids: list[int] = field(default_factory=list)
    deleted_task_ids: list[int] = field(default_factory=list)
    # entries of a bulk event (ANNOTATIONS_CREATED, ANNOTATIONS_DELETED, TASKS_DELETED) left out as
    # malformed, each with its reason: the well-formed ones are still written
    rejected: list[str] = field(default_factory=list)


def _ids_of(items: Any, what: str, rejected: list[str]) -> list[int]:
    """The ids of a bulk deletion; a malformed entry goes to ``rejected`` (the others still count),
    and an event with no well-formed entry at all is refused."""
    if not isinstance(items, list):
        raise BadEvent(f"'{what}' must be a list of {{\"id\": N}} objects")
    ids = []
    for i, item in enumerate(items):
        try:
            if isinstance(item, dict):
                if item.get("id") is None:
                    raise BadEvent(f"an entry of '{what}' has no 'id'")
                ids.append(_int_id(item["id"], f"{what}[].id"))
            else:
                ids.append(_int_id(item, f"{what}[]"))
        except BadEvent as exc:
            rejected.append(f"{what}[{i}]: {exc.message}")
    _refuse_if_nothing_left(len(items), rejected)
    return ids


def _refuse_if_nothing_left(entries: int, rejected: list[str]) -> None:
    if entries and len(rejected) == entries:
        raise BadEvent(rejected[0] if entries == 1 else f"no entry is well formed; the first: {rejected[0]}")


def parse_event(payload: Any) -> ParsedEvent:
    """Validate a webhook payload completely before anything is written.  Of a bulk event, the
    well-formed entries are kept and each malformed one is named in ``rejected``; a payload with no
    well-formed entry is refused whole."""
    if not isinstance(payload, dict):
        raise BadEvent("the webhook body must be a JSON object")
    action = payload.get("action")
    if not isinstance(action, str) or not action.strip():
        raise BadEvent("missing field 'action' (a Label Studio webhook event name)")
    if action not in HANDLED_ACTIONS:
        return ParsedEvent(action)
    listed = {ANNOTATIONS_DELETED: "annotations", TASKS_DELETED: "tasks"}.get(action)
    if listed and payload.get("project") is None and not payload.get(listed):
        # Label Studio's Data Manager sends the event for a deletion that found nothing to delete,
        # without a project: nothing to do (with ids and no project, the 400 below stands)
        return ParsedEvent(action)
    project = ProjectInfo.from_payload(payload.get("project"))
    parsed = ParsedEvent(action, project)
    if action in (ANNOTATION_CREATED, ANNOTATION_UPDATED):
        parsed.records.append(AnnotationRecord.from_payload(payload.get("annotation"), payload.get("task"), project.ls_id))
    elif action == ANNOTATIONS_CREATED:
        annotations, tasks = payload.get("annotation"), payload.get("task")
        if not isinstance(annotations, list) or not isinstance(tasks, list):
            raise BadEvent("ANNOTATIONS_CREATED needs 'annotation' and 'task' lists")
        # ids are matched as Label Studio sends them (numbers); anything else finds no task, and
        # the record then says what is missing
        by_id = {task.get("id"): task for task in tasks if isinstance(task, dict) and isinstance(task.get("id"), (int, str))}
        for i, annotation in enumerate(annotations):
            ref = annotation.get("task") if isinstance(annotation, dict) else None
            ref = ref.get("id") if isinstance(ref, dict) else ref
            task = by_id.get(ref) if isinstance(ref, (int, str)) else None
            try:
                parsed.records.append(AnnotationRecord.from_payload(annotation, task, project.ls_id))
            except BadEvent as exc:  # one malformed annotation does not cost the others theirs
                parsed.rejected.append(f"annotation[{i}]: {exc.message}")
        _refuse_if_nothing_left(len(annotations), parsed.rejected)
    elif action == ANNOTATIONS_DELETED:
        parsed.deleted_ids = _ids_of(payload.get("annotations"), "annotations", parsed.rejected)
    elif action == TASKS_DELETED:
        parsed.deleted_task_ids = _ids_of(payload.get("tasks"), "tasks", parsed.rejected)
    return parsed


# -- what comes out --------------------------------------------------------------------
@dataclass(frozen=True)
class EventOutcome:
    action: str
    project_key: str | None
    changed: int = 0  # annotations inserted, updated or deleted by this event
    trigger: bool = False  # START_TRAINING
    recorded: bool = False  # False for actions we do not keep
    ls_project_id: int | None = None
    ls_annotations: int | None = None  # Label Studio's count of non-cancelled annotations, as sent
    stored_annotations: int | None = None  # ours, after this event
    labels_since_training: int | None = None  # tasks changed since the last training run, after this event
    rejected: tuple[str, ...] = ()  # malformed entries of a bulk event, left out (the rest was written)

    @property
    def behind(self) -> bool:
        """Label Studio's count disagrees with ours: some event may have been missed."""
        return (
            self.ls_annotations is not None
            and self.stored_annotations is not None
            and self.ls_annotations != self.stored_annotations
        )


@dataclass(frozen=True)
class Example:
    task_id: int
    text: str
    labels: tuple[str, ...]
    annotation_id: int
    seq: int


@dataclass(frozen=True)
class ApplyCounts:
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    tombstoned: int = 0  # ignored: deleted earlier

    @property
    def changed(self) -> int:
        return self.inserted + self.updated


@dataclass(frozen=True)
class ProjectSummary:
    key: str
    ls_id: int
    title: str
    last_event_at: str | None
    annotations: int  # live, non-cancelled
    cancelled: int
    deleted: int  # tombstones
    tasks: int  # tasks with a live non-cancelled annotation
    labels: dict[str, dict[str, int]]  # control -> label -> examples (choices) or spans (labels)
    current_seq: int
    trained_seq: int
    labels_since_training: int
    label_studio_annotations: int | None  # as last reported by Label Studio
    label_configs: int
    last_sync: dict | None

    def to_dict(self) -> dict:
        return asdict(self)


# -- schema ----------------------------------------------------------------------------
def _id_type() -> sa.types.TypeEngine:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


metadata = sa.MetaData()
store_meta = sa.Table(
    "store_meta",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.BigInteger, nullable=False),
)
schema_version = sa.Table(
    "schema_version",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("applied_at", sa.Float, nullable=False),
)
projects = sa.Table(
    "projects",
    metadata,
    sa.Column("key", sa.String(200), primary_key=True),
    sa.Column("ls_id", sa.BigInteger, nullable=False),
    sa.Column("title", sa.Text, nullable=False),
    sa.Column("created_at", sa.String(64), nullable=False),
    sa.Column("first_seen", sa.Float, nullable=False),
    sa.Column("last_event_at", sa.Float),
    sa.Column("last_seq", sa.BigInteger, nullable=False),
    sa.Column("trained_seq", sa.BigInteger, nullable=False),
    sa.Column("full_trained_seq", sa.BigInteger),  # v5: the full lane's own mark (None: no full-lane job yet)
    sa.Column("live_annotations", sa.BigInteger, nullable=False),
    sa.Column("pending_tasks", sa.BigInteger, nullable=False, server_default="0"),  # v2
    sa.Column("ls_annotations", sa.BigInteger),
    sa.Column("label_config_id", sa.BigInteger),
    sa.Column("label_config_hash", sa.String(64)),
    sa.Column("config_updated_us", sa.BigInteger),
    sa.Column("ls_url", sa.Text),
    sa.Column("ls_token", sa.Text),
    sa.Column("sync_lease_until", sa.Float),
    sa.Column("sync_lease_holder", sa.Text),  # v6: who holds the lease (``lease_holder``); None: unknown
    sa.Column("last_sync", sa.Text),
)
label_configs = sa.Table(
    "label_configs",
    metadata,
    sa.Column("id", _id_type(), primary_key=True, autoincrement=True),
    sa.Column("project_key", sa.String(200), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.Column("xml", sa.Text, nullable=False),
    sa.Column("first_seen", sa.Float, nullable=False),
    sa.UniqueConstraint("project_key", "hash", name="uq_label_configs_project_hash"),
)
annotations = sa.Table(
    "annotations",
    metadata,
    sa.Column("project_key", sa.String(200), primary_key=True),
    sa.Column("annotation_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("task_id", sa.BigInteger, nullable=False),
    sa.Column("task_data", sa.Text, nullable=False),
    sa.Column("result", sa.Text, nullable=False),
    sa.Column("annotator", sa.String(200), nullable=False),
    sa.Column("was_cancelled", sa.Boolean, nullable=False),
    sa.Column("ground_truth", sa.Boolean, nullable=False),
    sa.Column("updated_us", sa.BigInteger, nullable=False),
    sa.Column("content_hash", sa.String(64), nullable=False),
    sa.Column("label_config_id", sa.BigInteger),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Index("ix_annotations_project_task", "project_key", "task_id"),
    sa.Index("ix_annotations_project_seq", "project_key", "seq"),
)
tombstones = sa.Table(
    "tombstones",
    metadata,
    sa.Column("project_key", sa.String(200), primary_key=True),
    sa.Column("annotation_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("task_id", sa.BigInteger),
    sa.Column("deleted_at", sa.Float, nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("updated_us", sa.BigInteger),  # v4: the deleted annotation's last updated_at held (None: never held)
)
deleted_tasks = sa.Table(  # v3: tasks deleted in Label Studio
    "deleted_tasks",
    metadata,
    sa.Column("project_key", sa.String(200), primary_key=True),
    sa.Column("task_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("deleted_at", sa.Float, nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("last_us", sa.BigInteger),  # v4: the newest updated_at of its labels held when deleted
)
changes = sa.Table(  # v1's change log: read by migration 2, no longer written
    "changes",
    metadata,
    sa.Column("id", _id_type(), primary_key=True, autoincrement=True),
    sa.Column("project_key", sa.String(200), nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("task_id", sa.BigInteger, nullable=False),
    sa.Index("ix_changes_project_seq", "project_key", "seq"),
)
task_changes = sa.Table(  # v2: the last training-relevant change of each task
    "task_changes",
    metadata,
    sa.Column("project_key", sa.String(200), primary_key=True),
    sa.Column("task_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("last_seq", sa.BigInteger, nullable=False),
    sa.Index("ix_task_changes_project_seq", "project_key", "last_seq"),
)
triggers = sa.Table(
    "triggers",
    metadata,
    sa.Column("id", _id_type(), primary_key=True, autoincrement=True),
    sa.Column("project_key", sa.String(200), nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("received_at", sa.Float, nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
)


def _v1_tables(md: sa.MetaData) -> list[sa.Table]:
    """The tables of schema version 1, frozen as released (the module's tables are the current shape)."""
    store_meta = sa.Table(
        "store_meta",
        md,
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.BigInteger, nullable=False),
    )
    projects = sa.Table(
        "projects",
        md,
        sa.Column("key", sa.String(200), primary_key=True),
        sa.Column("ls_id", sa.BigInteger, nullable=False),
        sa.Column("title", sa.Text, nullable=False),
        sa.Column("created_at", sa.String(64), nullable=False),
        sa.Column("first_seen", sa.Float, nullable=False),
        sa.Column("last_event_at", sa.Float),
        sa.Column("last_seq", sa.BigInteger, nullable=False),
        sa.Column("trained_seq", sa.BigInteger, nullable=False),
        sa.Column("live_annotations", sa.BigInteger, nullable=False),
        sa.Column("ls_annotations", sa.BigInteger),
        sa.Column("label_config_id", sa.BigInteger),
        sa.Column("label_config_hash", sa.String(64)),
        sa.Column("config_updated_us", sa.BigInteger),
        sa.Column("ls_url", sa.Text),
        sa.Column("ls_token", sa.Text),
        sa.Column("sync_lease_until", sa.Float),
        sa.Column("last_sync", sa.Text),
    )
    label_configs = sa.Table(
        "label_configs",
        md,
        sa.Column("id", _id_type(), primary_key=True, autoincrement=True),
        sa.Column("project_key", sa.String(200), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("xml", sa.Text, nullable=False),
        sa.Column("first_seen", sa.Float, nullable=False),
        sa.UniqueConstraint("project_key", "hash", name="uq_label_configs_project_hash"),
    )
    annotations = sa.Table(
        "annotations",
        md,
        sa.Column("project_key", sa.String(200), primary_key=True),
        sa.Column("annotation_id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("task_id", sa.BigInteger, nullable=False),
        sa.Column("task_data", sa.Text, nullable=False),
        sa.Column("result", sa.Text, nullable=False),
        sa.Column("annotator", sa.String(200), nullable=False),
        sa.Column("was_cancelled", sa.Boolean, nullable=False),
        sa.Column("ground_truth", sa.Boolean, nullable=False),
        sa.Column("updated_us", sa.BigInteger, nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("label_config_id", sa.BigInteger),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Index("ix_annotations_project_task", "project_key", "task_id"),
        sa.Index("ix_annotations_project_seq", "project_key", "seq"),
    )
    tombstones = sa.Table(
        "tombstones",
        md,
        sa.Column("project_key", sa.String(200), primary_key=True),
        sa.Column("annotation_id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("task_id", sa.BigInteger),
        sa.Column("deleted_at", sa.Float, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
    )
    changes = sa.Table(
        "changes",
        md,
        sa.Column("id", _id_type(), primary_key=True, autoincrement=True),
        sa.Column("project_key", sa.String(200), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("task_id", sa.BigInteger, nullable=False),
        sa.Index("ix_changes_project_seq", "project_key", "seq"),
    )
    triggers = sa.Table(
        "triggers",
        md,
        sa.Column("id", _id_type(), primary_key=True, autoincrement=True),
        sa.Column("project_key", sa.String(200), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("received_at", sa.Float, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
    )
    return [store_meta, projects, label_configs, annotations, tombstones, changes, triggers]


def _migration_1_initial(conn: Connection) -> None:
    """Version 1: the first tables."""
    for table in _v1_tables(sa.MetaData()):
        table.create(conn)
    conn.execute(sa.text("INSERT INTO store_meta (name, value) VALUES ('seq', 0)"))


def _migration_2_task_changes(conn: Connection) -> None:
    """Version 2: one change mark per task instead of a growing log, and a kept count of tasks changed since training.

    ``labels_since_training`` is read on every webhook (to decide on a training job): with the
    count kept in ``projects.pending_tasks`` it costs one row, not a scan of the log.  The
    ``changes`` log of version 1 is read once here and then left alone.
    """
    marks = sa.Table(
        "task_changes",
        sa.MetaData(),
        sa.Column("project_key", sa.String(200), primary_key=True),
        sa.Column("task_id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("last_seq", sa.BigInteger, nullable=False),
        sa.Index("ix_task_changes_project_seq", "project_key", "last_seq"),
    )
    marks.create(conn)
    conn.execute(sa.text("ALTER TABLE projects ADD COLUMN pending_tasks BIGINT NOT NULL DEFAULT 0"))
    conn.execute(
        sa.text(
            "INSERT INTO task_changes (project_key, task_id, last_seq) "
            "SELECT project_key, task_id, MAX(seq) FROM changes GROUP BY project_key, task_id"
        )
    )
    conn.execute(
        sa.text(
            "UPDATE projects SET pending_tasks = (SELECT COUNT(*) FROM task_changes t "
            "WHERE t.project_key = projects.key AND t.last_seq > projects.trained_seq)"
        )
    )


def _migration_3_deleted_tasks(conn: Connection) -> None:
    """Version 3: the tasks ``TASKS_DELETED`` named, so a late event for one of their annotations
    is not stored and the next batch to label never offers them."""
    sa.Table(
        "deleted_tasks",
        sa.MetaData(),
        sa.Column("project_key", sa.String(200), primary_key=True),
        sa.Column("task_id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("deleted_at", sa.Float, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
    ).create(conn)


def _migration_4_reused_ids(conn: Connection) -> None:
    """Version 4: Label Studio's own times beside each deleted annotation and task, so that an id
    Label Studio gives again (its SQLite import reuses the ids of the newest annotation and task
    deleted) is told from a late event of the deleted one."""
    conn.execute(sa.text("ALTER TABLE tombstones ADD COLUMN updated_us BIGINT"))
    conn.execute(sa.text("ALTER TABLE deleted_tasks ADD COLUMN last_us BIGINT"))


def _migration_5_full_lane_mark(conn: Connection) -> None:
    """Version 5: the full lane's own training mark.  The fast lane's refits move ``trained_seq``
    past labels no full-lane job has seen; the schedule and a full-lane job's look ahead read this
    one.  It starts at the project's mark (what earlier versions took as trained)."""
    conn.execute(sa.text("ALTER TABLE projects ADD COLUMN full_trained_seq BIGINT"))
    conn.execute(sa.text("UPDATE projects SET full_trained_seq = trained_seq"))


def _migration_6_lease_holder(conn: Connection) -> None:
    """Version 6: who holds a project's sync lease, so that a lease whose holder died (a job process
    killed by ``JOB_TIMEOUT`` or the OOM killer during Start Training's sync) is taken at once by
    the next sync instead of held by no one until it runs out."""
    conn.execute(sa.text("ALTER TABLE projects ADD COLUMN sync_lease_holder TEXT"))


# (version, description, function(conn)); applied in order, each once, never edited once released
MIGRATIONS: tuple[tuple[int, str, Callable[[Connection], None]], ...] = (
    (1, "initial tables", _migration_1_initial),
    (2, "per-task change marks and a kept count of tasks changed since training", _migration_2_task_changes),
    (3, "tasks deleted in Label Studio", _migration_3_deleted_tasks),
    (4, "Label Studio's times of deleted annotations and tasks (ids it gives again)", _migration_4_reused_ids),
    (5, "the full lane's own training mark", _migration_5_full_lane_mark),
    (6, "who holds a project's sync lease", _migration_6_lease_holder),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]


# statements on the webhook path, built once
_MARKS = sa.select(task_changes.c.task_id, task_changes.c.last_seq).where(
    task_changes.c.project_key == sa.bindparam("key"), task_changes.c.task_id.in_(sa.bindparam("tasks", expanding=True))
)
_MARK_MOVE = (
    task_changes.update()
    .where(task_changes.c.project_key == sa.bindparam("k"), task_changes.c.task_id == sa.bindparam("t"))
    .values(last_seq=sa.bindparam("s"))
)
_IDS_OF_TASKS = sa.select(annotations.c.annotation_id).where(
    annotations.c.project_key == sa.bindparam("key"), annotations.c.task_id.in_(sa.bindparam("tasks", expanding=True))
)
_DEAD_TASKS = sa.select(deleted_tasks.c.task_id, deleted_tasks.c.deleted_at, deleted_tasks.c.last_us, deleted_tasks.c.seq).where(
    deleted_tasks.c.project_key == sa.bindparam("key"), deleted_tasks.c.task_id.in_(sa.bindparam("tasks", expanding=True))
)
_DEAD_TASK_AGAIN = (
    deleted_tasks.update()
    .where(deleted_tasks.c.project_key == sa.bindparam("k"), deleted_tasks.c.task_id == sa.bindparam("t"))
    .values(deleted_at=sa.bindparam("d"), seq=sa.bindparam("s"), last_us=sa.bindparam("l"))
)
_PROJECT_BY_KEY = sa.select(projects).where(projects.c.key == sa.bindparam("key"))
_CONFIG_BY_HASH = sa.select(label_configs.c.id).where(
    label_configs.c.project_key == sa.bindparam("key"), label_configs.c.hash == sa.bindparam("hash")
)
_HELD = sa.union_all(
    sa.select(
        sa.literal("live").label("kind"),
        annotations.c.annotation_id,
        annotations.c.updated_us,
        annotations.c.content_hash,
        annotations.c.was_cancelled,
        annotations.c.task_id,
        annotations.c.task_data,
        sa.cast(sa.null(), sa.Float).label("deleted_at"),
        sa.cast(sa.null(), sa.BigInteger).label("tomb_seq"),
    ).where(annotations.c.project_key == sa.bindparam("key"), annotations.c.annotation_id.in_(sa.bindparam("ids", expanding=True))),
    sa.select(
        sa.literal("dead"),
        tombstones.c.annotation_id,
        tombstones.c.updated_us,
        sa.cast(sa.null(), sa.String(64)),
        sa.cast(sa.null(), sa.Boolean),
        tombstones.c.task_id,
        sa.cast(sa.null(), sa.Text),
        tombstones.c.deleted_at,
        tombstones.c.seq,
    ).where(tombstones.c.project_key == sa.bindparam("key"), tombstones.c.annotation_id.in_(sa.bindparam("ids", expanding=True))),
)


# -- who holds a sync lease ------------------------------------------------------------
def _proc_stat(pid: int | str) -> tuple[str, str] | None:
    """A Linux process's state letter and start time (clock ticks after boot), or None where it
    does not exist (or this is not Linux)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # after "pid (comm) ": comm may hold spaces
    return fields[0], fields[19]


def _this_process() -> tuple[str, str, str, int, str]:
    """This machine's name and boot (two machines may share a name), its pid namespace (processes
    of another container number their own), this process's pid and its start time: what tells it
    from a later process given its pid."""
    import socket

    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        boot = namespace = ""
    stat = _proc_stat("self")
    return socket.gethostname().replace("|", "_"), boot, namespace, os.getpid(), stat[1] if stat else ""


def lease_holder() -> str:
    """A holder for a sync lease: this process, and a token of its own per claim (two threads of
    one process never release each other's lease)."""
    host, boot, namespace, pid, started = _this_process()
    return f"{host}|{boot}|{namespace}|{pid}|{started}|{os.urandom(4).hex()}"


def holder_gone(holder: str) -> bool:
    """Whether a lease's holder is a process that is gone: one of this machine's boot and pid
    namespace, no longer running (or a zombie no one has reaped), or its pid now another process's.
    A holder on another machine or in another container cannot be told: it holds until its lease
    runs out."""
    parts = holder.split("|")
    if len(parts) != 6:
        return False
    _host, boot, namespace, pid, started, _token = parts
    here = _this_process()
    if not boot or not namespace or (boot, namespace) != here[1:3] or not pid.isdigit():
        return False
    stat = _proc_stat(pid)
    return stat is None or stat[0] in ("Z", "X") or stat[1] != started


# -- engines ---------------------------------------------------------------------------
def database_url(url: str) -> str:
    """A SQLAlchemy URL for ``DATABASE_URL``: plain ``postgres(ql)://`` is pointed at psycopg 3."""
    url = url.strip()
    for plain in ("postgres://", "postgresql://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain):]
    if url.startswith(("postgresql+psycopg://", "sqlite://", "sqlite+pysqlite://")):
        return url
    raise StoreError(
        f"DATABASE_URL scheme not supported: {url.split('://', 1)[0]!r} "
        "(use postgresql://user:pass@host:5432/db, or leave it unset for SQLite under MODEL_DIR)"
    )


def _sqlite_engine(url: str) -> Engine:
    engine = sa.create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):  # pragma: no cover - exercised through every query
        # let SQLAlchemy say BEGIN itself (the sqlite3 module's own handling skips it for reads and DDL)
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = FULL")  # a 2xx means the event is on disk
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):  # pragma: no cover
        # writers take the write lock at BEGIN, so a read-then-write never fails with "database is locked"
        mode = conn.get_execution_options().get("sqlite_begin", "IMMEDIATE")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


def create_store_engine(url: str) -> Engine:
    url = database_url(url)
    if url.startswith("sqlite"):
        return _sqlite_engine(url)
    return sa.create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)


def migrate(engine: Engine) -> int:
    """Bring the schema to ``SCHEMA_VERSION``; safe when several processes start at once."""
    with engine.begin() as conn:  # BEGIN IMMEDIATE on SQLite: one migrating process at a time
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        schema_version.create(conn, checkfirst=True)
        done = set(conn.execute(sa.select(schema_version.c.version)).scalars())
        if done and max(done) > SCHEMA_VERSION:
            raise StoreError(
                f"the store's schema is version {max(done)}, newer than this ls-backend knows ({SCHEMA_VERSION}); "
                "upgrade ls-backend"
            )
        for version, name, apply in MIGRATIONS:
            if version in done:
                continue
            log.info("store: applying schema migration %d (%s)", version, name)
            apply(conn)
            conn.execute(schema_version.insert().values(version=version, name=name, applied_at=time.time()))
    return SCHEMA_VERSION


def _iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _choices_of(result: list, control_name: str) -> list[str]:
    chosen: list[str] = []
    for item in result:
        if item.get("from_name") != control_name:
            continue
        value = item.get("value")
        values = value.get("choices") if isinstance(value, dict) else None
        if isinstance(values, list):
            chosen.extend(str(v) for v in values if isinstance(v, (str, int, float)))
    return chosen


def _newest(rows: Iterable[Any]) -> Any:
    return max(rows, key=lambda row: (row.updated_us, row.annotation_id))


def resolve_task(candidates: Sequence[Any], labels_of: Callable[[Any], tuple]) -> Any:
    """The annotation that speaks for a task (the rule in the module docstring).

    ``candidates`` are the task's non-cancelled annotations that hold something for the
    control; ``labels_of(row)`` is the label set a row gives.
    """
    truth = [row for row in candidates if row.ground_truth]
    if truth:
        return _newest(truth)
    per_annotator: dict[str, Any] = {}
    for row in candidates:
        who = row.annotator or f"#{row.annotation_id}"
        if who not in per_annotator or (row.updated_us, row.annotation_id) > (
            per_annotator[who].updated_us,
            per_annotator[who].annotation_id,
        ):
            per_annotator[who] = row
    votes = Counter(labels_of(row) for row in per_annotator.values())
    most = max(votes.values())
    return _newest(row for row in per_annotator.values() if votes[labels_of(row)] == most)


# -- the store -------------------------------------------------------------------------
INSERTED, UPDATED, UNCHANGED, BURIED = "inserted", "updated", "unchanged", "buried"
_ALL_COLUMNS = (
    "task_id", "task_data", "result", "annotator", "was_cancelled", "ground_truth", "updated_us", "content_hash",
    "label_config_id", "seq", "source",
)


class _Held:
    """One annotation inside a write transaction: what the database held, and what it will hold."""

    __slots__ = ("start", "now", "dead", "columns", "tomb_task", "tomb_us", "tomb_at", "tomb_seq", "reused")

    def __init__(self, start: str, now: dict | None, tomb_task: int | None = None, tomb_us: int | None = None,
                 tomb_at: float | None = None, tomb_seq: int | None = None):
        self.start = start  # "live", "dead" (tombstone) or "none"
        self.now = now  # its columns as they stand (None: no live row)
        self.dead = start == "dead"
        self.columns: set[str] = set()  # columns to write
        self.tomb_task = tomb_task  # the buried annotation's task, and its last updated_at held
        self.tomb_us = tomb_us
        self.tomb_at = tomb_at  # a stored tombstone's deletion (this machine's clock) and its write's seq
        self.tomb_seq = tomb_seq
        self.reused = False  # a tombstone's id given to a new annotation: the tombstone row goes

    def bury(self, task_id: int | None, updated_us: int | None) -> None:
        self.dead, self.tomb_task, self.tomb_us, self.now = True, task_id, updated_us, None
        self.tomb_at = self.tomb_seq = None

    def given_again(self, record: "AnnotationRecord", listed_at_seq: int | None = None) -> bool:
        """Whether ``record``, under this buried id, is a new annotation Label Studio gave the id
        to: on another task, or made after the buried one's last change (Label Studio's clock), or,
        where the store never held the buried one (its deletion was all it heard of it), made after
        the deletion (this machine's clock); a late event of the buried annotation is none of these.
        ``listed_at_seq``: the record is in Label Studio's listing read by a sync that began after
        the store's write ``listed_at_seq``; a deletion stored by then is of an annotation Label
        Studio no longer had, so the one it lists under the id is a new one."""
        if self.tomb_task is not None and record.task_id != self.tomb_task:
            return True
        if listed_at_seq is not None and self.tomb_seq is not None and self.tomb_seq <= listed_at_seq:
            return True
        if record.created_us is None:
            return False
        if self.tomb_us is not None:
            return record.created_us > self.tomb_us
        # never held (no task known; a store of schema 3 kept no stamp for the ones it held)
        return self.tomb_task is None and self.tomb_at is not None and record.created_us > self.tomb_at * 1_000_000


class _ProjectWork:
    """One project's share of a write transaction (a unit of work).

    The project's row and the annotations the events name are read once, every event is
    applied in memory, in arrival order, under the store's rules, and ``flush`` writes the
    result with a handful of statements, however many events the transaction holds.
    """

    def __init__(self, store: "CorrectionStore", conn: Connection, row: Any, now: float, seen: dict | None):
        self.store, self.conn, self.now, self.seen = store, conn, now, seen
        self.key = row.key
        self.state = dict(row._mapping)
        self.values: dict[str, Any] = {}
        self.held: dict[int, _Held] = {}
        self.live = int(self.state["live_annotations"])
        self.pending = int(self.state["pending_tasks"])
        self.touched: set[int] = set()
        self.triggers: list[dict] = []
        self.tasks_known: set[int] = set()  # task ids whose deletion state has been read
        # of those, the deleted ones: when (this machine's clock), their labels' newest updated_at, and
        # the seq of the write that stored the deletion (None: deleted by this transaction)
        self.dead_tasks: dict[int, tuple[float, int | None, int | None]] = {}
        self.buried_tasks: list[int] = []  # deleted by this transaction
        self.reburied_tasks: list[int] = []  # deleted again by it (a new task under a deleted id: ``upsert``)
        self.ground_truths: dict[int, int] = {}  # task -> the annotation this transaction made its ground truth

    def set(self, **values: Any) -> None:
        for name, value in values.items():
            if self.state.get(name) != value:
                self.state[name] = value
                self.values[name] = value

    # -- the project ------------------------------------------------------------------
    def note(self, info: ProjectInfo, event_time: bool = True) -> int | None:
        """What an event says about its project; returns the id of the label config it came with."""
        if event_time:
            self.set(last_event_at=self.now)
        if info.title:
            self.set(title=info.title)
        if info.created_at and not self.state["created_at"]:
            self.set(created_at=info.created_at)
        if info.total_annotations is not None:
            self.set(ls_annotations=info.total_annotations)
        if info.label_config:
            return self.snapshot(info.label_config, info.updated_us, info.current, info.held_at_read)
        return self.state["label_config_id"]

    def snapshot(self, xml: str, updated_us: int | None, current: bool = False,
                 held_at_read: tuple | None = None) -> int:
        """Keep a config snapshot; point the project at it when it is the newest one.

        Webhooks carry the project's ``updated_at`` (Label Studio's clock), which orders config
        changes.  The API (a sync) does not send it: what it returns was in force when it was read.
        Such a config (``current``) is stamped just after the one held, never with this machine's
        clock (Label Studio's may differ from it by any amount), unless the held one changed since
        the read began (``held_at_read``): a webhook brought that one meanwhile, so it is newer.
        A later webhook with Label Studio's time then orders as usual.
        """
        digest = hashlib.sha256(xml.encode()).hexdigest()
        config_id = self.store._config_ids.get((self.key, digest))  # ids known to be committed
        if config_id is None:
            config_id = self.conn.execute(_CONFIG_BY_HASH, {"key": self.key, "hash": digest}).scalar_one_or_none()
        if config_id is None:
            config_id = self.conn.execute(
                label_configs.insert().values(project_key=self.key, hash=digest, xml=xml, first_seen=self.now)
            ).inserted_primary_key[0]
        if self.seen is not None:  # the caller caches these once the transaction is committed
            self.seen[(self.key, digest)] = config_id
        state = self.state
        held = (state["config_updated_us"] if state["config_updated_us"] is not None else -1,
                state["label_config_hash"] or "")
        if current and digest != state["label_config_hash"]:
            if held_at_read is not None and tuple(held_at_read) != (state["config_updated_us"], state["label_config_hash"]):
                return config_id  # changed by a webhook while the project was read: newer than the read
            updated_us = held[0] + 1
        candidate = (updated_us if updated_us is not None else -1, digest)
        if state["label_config_id"] is None or (updated_us is not None and candidate > held):
            if state["label_config_id"] is not None and state["label_config_hash"] != digest:
                log.info("project %s: label config changed (snapshot %s)", self.key, digest[:12])
            self.set(label_config_id=config_id, label_config_hash=digest, config_updated_us=updated_us)
        return config_id

    # -- annotations --------------------------------------------------------------------
    def load(self, ids: Iterable[int]) -> None:
        """Read the annotations and tombstones of these ids that are not in hand yet."""
        missing = sorted({i for i in ids if i not in self.held})
        for chunk in _chunks(missing, 500):
            found: dict[int, _Held] = {}
            for row in self.conn.execute(_HELD, {"key": self.key, "ids": list(chunk)}):
                if row.kind == "dead":
                    found[row.annotation_id] = _Held("dead", None, row.task_id, row.updated_us, row.deleted_at,
                                                     row.tomb_seq)
                elif row.annotation_id not in found:
                    found[row.annotation_id] = _Held("live", {
                        "updated_us": row.updated_us, "content_hash": row.content_hash,
                        "was_cancelled": bool(row.was_cancelled), "task_id": row.task_id, "task_data": row.task_data,
                    })
            for annotation_id in chunk:
                self.held[annotation_id] = found.get(annotation_id) or _Held("none", None)

    def load_tasks(self, task_ids: Iterable[int]) -> None:
        """Read which of these tasks were deleted in Label Studio, for those not in hand yet."""
        missing = sorted({int(t) for t in task_ids} - self.tasks_known)
        for chunk in _chunks(missing, 500):
            for task_id, deleted_at, last_us, seq in self.conn.execute(_DEAD_TASKS, {"key": self.key, "tasks": list(chunk)}):
                self.dead_tasks[int(task_id)] = (float(deleted_at), last_us, int(seq))
        self.tasks_known.update(missing)

    def delete_tasks(self, task_ids: Sequence[int]) -> int:
        """Tasks deleted in Label Studio: their annotations are deleted (tombstoned) and the tasks
        remembered, so that a late event for one of them is not stored; the annotations deleted."""
        self.load_tasks(task_ids)
        ids = self.ids_of_tasks(task_ids)
        newest: dict[int, int] = {}  # per task, the newest updated_at of its labels (Label Studio's clock)
        for annotation_id in ids:
            now = self.held[annotation_id].now
            newest[now["task_id"]] = max(newest.get(now["task_id"], now["updated_us"]), now["updated_us"])
        for task_id in dict.fromkeys(int(t) for t in task_ids):
            before = self.dead_tasks.get(task_id)
            if before is None:
                self.buried_tasks.append(task_id)
            elif task_id not in self.buried_tasks and task_id not in self.reburied_tasks:
                self.reburied_tasks.append(task_id)
            last = [us for us in (before[1] if before else None, newest.get(task_id)) if us is not None]
            self.dead_tasks[task_id] = (self.now, max(last) if last else None, None)
        return sum(self.delete(i) for i in ids)

    def ids_of_tasks(self, task_ids: Iterable[int]) -> list[int]:
        """Live annotation ids on these tasks, in the database or added in this transaction."""
        wanted = set(task_ids)
        ids: set[int] = set()
        for chunk in _chunks(sorted(wanted), 500):
            ids.update(self.conn.execute(_IDS_OF_TASKS, {"key": self.key, "tasks": list(chunk)}).scalars())
        ids.update(i for i, h in self.held.items() if h.now is not None and h.now["task_id"] in wanted)
        self.load(ids)
        return sorted(i for i in ids if not self.held[i].dead)

    def upsert(self, record: AnnotationRecord, config_id: int | None, seq: int, source: str,
               listed_at_seq: int | None = None) -> str:
        """Apply one annotation version; ``listed_at_seq``: it comes from Label Studio's listing,
        read by a sync that began after the store's write ``listed_at_seq`` (see ``given_again``)."""
        held = self.held[record.annotation_id]
        if held.dead:
            if not held.given_again(record, listed_at_seq):
                return BURIED
            held.dead, held.reused = False, True  # a new annotation under a deleted one's id
        dead_task = self.dead_tasks.get(record.task_id)
        # an annotation made after its task was deleted is on a new task under that id (Label Studio
        # on SQLite gives the next task the id of the last one deleted): its labels count; so do the
        # labels a sync finds on a task deleted before it began reading (Label Studio lists it: a new task)
        listed_anew = (listed_at_seq is not None and dead_task is not None and dead_task[2] is not None
                       and dead_task[2] <= listed_at_seq)
        if dead_task is not None and not listed_anew and not _made_after(record, *dead_task[:2]):
            # a late event for an annotation of a deleted task: deleted too
            if held.now is None:
                held.bury(record.task_id, record.updated_us)
            else:
                self.delete(record.annotation_id)
            return BURIED
        data = canonical_json(record.task_data)
        now = held.now
        if now is None:
            held.now = self._columns(record, data, config_id, seq, source)
            held.columns.update(_ALL_COLUMNS)
            if not record.was_cancelled:
                self.live += 1
                self.touched.add(record.task_id)
            if listed_at_seq is None:  # (a sync's listing holds each flag as it stands)
                self._note_ground_truth(record)
            return INSERTED
        # Label Studio changes some fields without a new updated_at (a ground truth moved to another
        # annotation clears the old one's flag, with no webhook): what a sync lists is how things
        # stand, so at an equal stamp the listing's version replaces the one held
        restamped = (listed_at_seq is not None and record.updated_us == now["updated_us"]
                     and record.content_hash != now["content_hash"])
        if not restamped and (record.updated_us, record.content_hash) <= (now["updated_us"], now["content_hash"]):
            if record.content_hash == now["content_hash"] and record.updated_us == now["updated_us"] and data != now["task_data"]:
                now["task_data"] = data  # the same label on edited task data: keep the text current
                held.columns.add("task_data")
                self._text_changed(record)
            return UNCHANGED
        if record.content_hash == now["content_hash"]:
            if data != now["task_data"]:
                self._text_changed(record)
            now.update(updated_us=record.updated_us, task_data=data)  # a newer stamp on the same label
            held.columns.update(("updated_us", "task_data"))
            return UNCHANGED
        self.live += (0 if record.was_cancelled else 1) - (0 if now["was_cancelled"] else 1)
        if not (record.was_cancelled and now["was_cancelled"]):
            self.touched.update((record.task_id, now["task_id"]))
        held.now = self._columns(record, data, config_id, seq, source)
        held.columns.update(_ALL_COLUMNS)
        if listed_at_seq is None:
            self._note_ground_truth(record)
        return UPDATED

    def _text_changed(self, record: AnnotationRecord) -> None:
        """The same label on edited task data: what the model learns from the task changed, so it
        counts towards the next training as a changed label does."""
        if not record.was_cancelled:
            self.touched.add(record.task_id)

    def _note_ground_truth(self, record: AnnotationRecord) -> None:
        """A version marked ground truth: Label Studio keeps one per task and clears the flag of the
        task's other annotations (``Task.ensure_unique_groundtruth``: a plain update, no webhook, no
        new updated_at), so ``flush`` clears theirs here too; else, once the new one was unmarked,
        the old one would speak for the task again, over the annotators' votes."""
        if record.ground_truth:
            self.ground_truths[record.task_id] = record.annotation_id
        elif self.ground_truths.get(record.task_id) == record.annotation_id:
            del self.ground_truths[record.task_id]

    @staticmethod
    def _columns(record: AnnotationRecord, data: str, config_id: int | None, seq: int, source: str) -> dict:
        return {
            "task_id": record.task_id,
            "task_data": data,
            "result": canonical_json(record.result),
            "annotator": record.annotator[:200],
            "was_cancelled": record.was_cancelled,
            "ground_truth": record.ground_truth,
            "updated_us": record.updated_us,
            "content_hash": record.content_hash,
            "label_config_id": config_id,
            "seq": seq,
            "source": source,
        }

    def delete(self, annotation_id: int) -> int:
        """Delete (tombstone) one annotation; 1 when it was live."""
        held = self.held[annotation_id]
        if held.dead:
            return 0
        now = held.now
        held.bury(now["task_id"] if now else None, now["updated_us"] if now else None)
        if now is None:
            return 0
        if not now["was_cancelled"]:
            self.live -= 1
            self.touched.add(now["task_id"])
        return 1

    def _clear_other_ground_truths(self, seq: int) -> None:
        """(``flush``, after the versions are written) The flag off every other annotation of the
        tasks a version made ground truth, each one's content hash made anew to match."""
        cleared = []
        for chunk in _chunks(sorted(self.ground_truths), 500):
            for row in self.conn.execute(_OTHER_GROUND_TRUTHS, {"key": self.key, "tasks": list(chunk)}):
                if row.annotation_id == self.ground_truths[int(row.task_id)]:
                    continue
                digest = label_hash(int(row.task_id), json.loads(row.result), row.annotator, bool(row.was_cancelled), False)
                cleared.append({"k": self.key, "a": row.annotation_id, "s": seq, "h": digest})
        if cleared:
            self.conn.execute(_CLEAR_GROUND_TRUTH, cleared)
            log.info("project %s: ground truth cleared on %d other annotation(s) of its task(s), as Label Studio "
                     "does", self.key, len(cleared))

    def flush(self, seq: int) -> None:
        """Write everything this transaction changed for the project."""
        conn, key = self.conn, self.key
        inserts, updates, removed, buried, unburied = [], defaultdict(list), [], [], []
        for annotation_id, held in self.held.items():
            if held.reused:  # the tombstone of the id Label Studio gave again goes (a new one below if deleted again)
                unburied.append(annotation_id)
            if held.dead:
                if held.start == "live":
                    removed.append(annotation_id)
                if held.start != "dead" or held.reused:
                    buried.append({"project_key": key, "annotation_id": annotation_id, "task_id": held.tomb_task,
                                   "deleted_at": self.now, "seq": seq, "updated_us": held.tomb_us})
            elif held.columns and held.now is not None:
                if held.start != "live":
                    inserts.append({"project_key": key, "annotation_id": annotation_id, **held.now})
                else:
                    columns = tuple(sorted(held.columns))
                    updates[columns].append({"k": key, "a": annotation_id, **{f"v_{c}": held.now[c] for c in columns}})
        for chunk in _chunks(unburied, 500):
            conn.execute(tombstones.delete().where(tombstones.c.project_key == key,
                                                   tombstones.c.annotation_id.in_(list(chunk))))
        if inserts:
            conn.execute(annotations.insert(), inserts)
        for columns, rows in updates.items():
            conn.execute(_annotation_update(columns), rows)
        for chunk in _chunks(removed, 500):
            conn.execute(annotations.delete().where(annotations.c.project_key == key,
                                                    annotations.c.annotation_id.in_(list(chunk))))
        if buried:
            conn.execute(tombstones.insert(), buried)
        if self.buried_tasks:
            conn.execute(deleted_tasks.insert(), [{"project_key": key, "task_id": t, "deleted_at": self.now, "seq": seq,
                                                   "last_us": self.dead_tasks[t][1]} for t in self.buried_tasks])
        if self.reburied_tasks:
            conn.execute(_DEAD_TASK_AGAIN, [{"k": key, "t": t, "d": self.now, "s": seq, "l": self.dead_tasks[t][1]}
                                            for t in self.reburied_tasks])
        if self.ground_truths:
            self._clear_other_ground_truths(seq)
        if self.touched:
            self.pending += self.store._mark_tasks(conn, key, self.touched, seq, self.state["trained_seq"])
            self.set(last_seq=seq, pending_tasks=self.pending)
        self.set(live_annotations=self.live)
        if self.values:
            conn.execute(projects.update().where(projects.c.key == key).values(**self.values))
        if self.triggers:
            conn.execute(triggers.insert(), self.triggers)


_OTHER_GROUND_TRUTHS = sa.select(
    annotations.c.annotation_id, annotations.c.task_id, annotations.c.result, annotations.c.annotator,
    annotations.c.was_cancelled,
).where(annotations.c.project_key == sa.bindparam("key"), annotations.c.task_id.in_(sa.bindparam("tasks", expanding=True)),
        annotations.c.ground_truth == sa.true())
_CLEAR_GROUND_TRUTH = (
    annotations.update()
    .where(annotations.c.project_key == sa.bindparam("k"), annotations.c.annotation_id == sa.bindparam("a"))
    .values(ground_truth=False, content_hash=sa.bindparam("h"), seq=sa.bindparam("s"))
)


def _made_after(record: AnnotationRecord, deleted_at: float, last_us: int | None) -> bool:
    """Whether ``record`` was made after its task (under this id) was deleted: after the newest label
    held on the deleted task (Label Studio's clock, where one was held), or after the deletion
    (this machine's clock); either way it is on a new task Label Studio gave the id to."""
    created = record.created_us
    if created is None:
        return False
    return created > deleted_at * 1_000_000 or (last_us is not None and created > last_us)


def _annotation_update(columns: tuple[str, ...]) -> Any:
    return (
        annotations.update()
        .where(annotations.c.project_key == sa.bindparam("k"), annotations.c.annotation_id == sa.bindparam("a"))
        .values({c: sa.bindparam(f"v_{c}") for c in columns})
    )


class _Pending:
    __slots__ = ("item", "result", "error", "done")

    def __init__(self, item: Any):
        self.item = item
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()


class _GroupCommit:
    """Group commit: the events that arrive while a transaction is being written share the next one.

    A commit costs an fsync (milliseconds); under concurrent webhooks one commit per event
    would cap a process at a few hundred events a second and queue the rest.  Here one
    thread per process writes: it takes every event waiting (up to ``max_batch``), writes
    them in one transaction, each in its own savepoint, commits once, and only then wakes
    their callers.  A caller still answers only after its event is on disk.
    """

    def __init__(self, write_batch: Callable[[list[Any]], list[Any]], max_batch: int = 256):
        self._write_batch = write_batch
        self._max_batch = max_batch
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def submit(self, item: Any) -> Any:
        pending = _Pending(item)
        with self._lock:
            if self._thread is None or not self._thread.is_alive() or self._pid != os.getpid():
                self._queue = queue.SimpleQueue()
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, args=(self._queue,), name="store-writer", daemon=True)
                self._thread.start()
            self._queue.put(pending)
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.result

    def _run(self, waiting: "queue.SimpleQueue[_Pending | None]") -> None:
        while True:
            first = waiting.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self._max_batch:
                try:
                    more = waiting.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    waiting.put(None)
                    break
                batch.append(more)
            try:
                results = self._write_batch([pending.item for pending in batch])
                for pending, result in zip(batch, results):
                    if isinstance(result, BaseException):
                        pending.error = result
                    else:
                        pending.result = result
            except BaseException as exc:  # the commit failed: nobody's event is stored
                for pending in batch:
                    pending.error = exc
            finally:
                for pending in batch:
                    pending.done.set()

    def close(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is not None and thread.is_alive() and self._pid == os.getpid():
                self._queue.put(None)
        if thread is not None and thread.is_alive():
            thread.join(timeout=10)


class CorrectionStore:
    """Durable annotations per project; see the module docstring for the rules."""

    def __init__(self, url: str):
        self.url = database_url(url)
        self.engine = create_store_engine(self.url)
        self.dialect = self.engine.dialect.name
        database = sa.make_url(self.url).database
        self._lock_path = f"{database}.writers" if self.dialect == "sqlite" and database not in (None, "", ":memory:") else None
        migrate(self.engine)
        self._config_ids: dict[tuple[str, str], int] = {}
        self._group = _GroupCommit(self._record_batch)

    @classmethod
    def from_settings(cls, settings: Any) -> "CorrectionStore":
        url = getattr(settings, "database_url", "") or ""
        if not url:
            folder = Path(settings.model_dir)
            folder.mkdir(parents=True, exist_ok=True)
            url = f"sqlite:///{(folder / SQLITE_NAME).resolve()}"
        return cls(url)

    def close(self) -> None:
        self._group.close()
        self.engine.dispose()

    def describe(self) -> str:
        """Where the store lives (password masked)."""
        from .settings import _mask_password

        return _mask_password(sa.make_url(self.url).render_as_string(hide_password=True))

    # -- transactions ---------------------------------------------------------------
    @contextmanager
    def _write(self) -> Iterator[tuple[Connection, int]]:
        """One write transaction and its change sequence number."""
        with self._writers_queue(), self.engine.begin() as conn:
            seq = conn.execute(
                store_meta.update()
                .where(store_meta.c.name == "seq")
                .values(value=store_meta.c.value + 1)
                .returning(store_meta.c.value)
            ).scalar_one()
            yield conn, seq

    @contextmanager
    def _writers_queue(self) -> Iterator[None]:
        """SQLite: writers of all processes wait for each other on a file lock before BEGIN IMMEDIATE.

        SQLite's own busy handler polls with growing sleeps, so under a burst a writer can miss
        its turn again and again (seconds of tail latency); a blocked ``flock`` is woken as soon
        as the lock is free.  The busy timeout still guards writers that do not take this lock.
        """
        if self._lock_path is None:
            yield
            return
        with open(self._lock_path, "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self.engine.connect().execution_options(sqlite_begin="DEFERRED") as conn:
            with conn.begin():
                yield conn

    # -- projects, configs ----------------------------------------------------------
    def _project_row(self, conn: Connection, key: str) -> Any:
        return conn.execute(_PROJECT_BY_KEY, {"key": key}).one_or_none()

    def _work(
        self, conn: Connection, info: ProjectInfo | None, key: str, now: float, seen: dict | None, works: dict
    ) -> _ProjectWork:
        """The project's unit of work in this transaction (its row created when an event names a new project)."""
        work = works.get(key)
        if work is None:
            row = self._project_row(conn, key)
            if row is None:
                if info is None:
                    raise UnknownProject(f"no project {key!r} in the store")
                conn.execute(
                    projects.insert().values(
                        key=key, ls_id=info.ls_id, title=info.title, created_at=info.created_at, first_seen=now,
                        last_seq=0, trained_seq=0, live_annotations=0, pending_tasks=0,
                    )
                )
                row = self._project_row(conn, key)
            work = works[key] = _ProjectWork(self, conn, row, now, seen)
        return work

    @staticmethod
    def _mark_tasks(conn: Connection, key: str, tasks: set[int], seq: int, trained_seq: int) -> int:
        """Move the tasks' change marks to ``seq``; returns how many of them were not pending training yet."""
        fresh = 0
        for chunk in _chunks(sorted(tasks), 500):
            held = {row.task_id: row.last_seq for row in conn.execute(_MARKS, {"key": key, "tasks": list(chunk)})}
            new = [{"project_key": key, "task_id": t, "last_seq": seq} for t in chunk if t not in held]
            if new:
                conn.execute(task_changes.insert(), new)
            old = [{"k": key, "t": t, "s": seq} for t in chunk if t in held]
            if old:
                conn.execute(_MARK_MOVE, old)
            fresh += sum(1 for t in chunk if held.get(t, -1) <= trained_seq)
        return fresh

    def record_event(self, payload: dict) -> EventOutcome:
        """Write one webhook event (all of it or nothing; of a bulk event, all its well-formed entries:
        see :func:`parse_event`); raises :class:`BadEvent` for malformed ones.

        It returns once the transaction holding the event is committed.  Concurrent callers
        in one process share transactions (see :class:`_GroupCommit`).
        """
        parsed = parse_event(payload)
        if parsed.project is None:
            return self._not_kept(parsed.action, payload.get("project"))
        outcome = self._group.submit(parsed)
        log.info("webhook %s project %s: %d annotation(s) changed", outcome.action, outcome.project_key, outcome.changed)
        return outcome

    def _record_batch(self, batch: Sequence[ParsedEvent]) -> list[EventOutcome | Exception]:
        """Several events in one transaction.

        Should one of them fail (a bug, not a busy database), the transaction is rolled back
        and each event is written again in a transaction of its own, so that one bad event
        spoils none of the others.
        """
        try:
            return self._record_together(batch)
        except sa.exc.OperationalError:
            raise  # the database is unreachable or locked: all of them failed
        except Exception:
            if len(batch) == 1:
                raise
        results: list[EventOutcome | Exception] = []
        for parsed in batch:
            try:
                results.extend(self._record_together([parsed]))
            except Exception as exc:
                log.exception("%s for project %s could not be stored", parsed.action, parsed.project and parsed.project.key)
                results.append(exc)
        return results

    def _record_together(self, batch: Sequence[ParsedEvent]) -> list[EventOutcome | Exception]:
        now = time.time()
        seen: dict[tuple[str, str], int] = {}
        works: dict[str, _ProjectWork] = {}
        applied: list[tuple[ParsedEvent, int, int]] = []
        with self._write() as (conn, seq):
            for parsed in batch:  # read what the events name, once per project
                info = parsed.project
                assert info is not None
                work = self._work(conn, info, info.key, now, seen, works)
                work.load([r.annotation_id for r in parsed.records] + parsed.deleted_ids)
                work.load_tasks([r.task_id for r in parsed.records] + parsed.deleted_task_ids)
            for parsed in batch:
                info = parsed.project
                work = works[info.key]
                config_id = work.note(info)
                changed = 0
                if parsed.records:
                    changed = sum(
                        work.upsert(record, config_id, seq, "webhook") in (INSERTED, UPDATED) for record in parsed.records
                    )
                elif parsed.deleted_ids:
                    changed = sum(work.delete(annotation_id) for annotation_id in parsed.deleted_ids)
                elif parsed.deleted_task_ids:
                    changed = work.delete_tasks(parsed.deleted_task_ids)
                elif parsed.action == START_TRAINING:
                    work.triggers.append({"project_key": info.key, "action": parsed.action, "received_at": now,
                                          "seq": seq})
                applied.append((parsed, changed, work.live))
            for work in works.values():
                work.flush(seq)
        self._config_ids.update(seen)  # committed now
        return [
            EventOutcome(
                action=parsed.action,
                project_key=parsed.project.key,
                changed=changed,
                trigger=parsed.action == START_TRAINING,
                recorded=True,
                ls_project_id=parsed.project.ls_id,
                ls_annotations=parsed.project.total_annotations,
                stored_annotations=live,
                labels_since_training=works[parsed.project.key].pending,
                rejected=tuple(parsed.rejected),
            )
            for parsed, changed, live in applied
        ]

    def _not_kept(self, action: str, project: Any) -> EventOutcome:
        """An action we do not store: answered, and its project count still compared with ours."""
        log.debug("webhook %s: not kept", action)
        try:
            info = ProjectInfo.from_payload(project)
        except BadEvent:
            return EventOutcome(action=action, project_key=None)
        with self._read() as conn:
            stored = conn.execute(sa.select(projects.c.live_annotations).where(projects.c.key == info.key)).scalar()
        return EventOutcome(
            action=action,
            project_key=info.key,
            ls_project_id=info.ls_id,
            ls_annotations=info.total_annotations if stored is not None else None,
            stored_annotations=stored,
        )

    def ingest(self, info: ProjectInfo, records: Sequence[AnnotationRecord], source: str = "sync",
               listed_at_seq: int | None = None) -> ApplyCounts:
        """Upsert annotation versions fetched from Label Studio, in one transaction; ``listed_at_seq``:
        they are Label Studio's listing, read after the store's write ``listed_at_seq`` (a deletion
        stored by then does not hold against an annotation the listing has: it is a new one)."""
        now = time.time()
        outcomes: Counter[str] = Counter()
        with self._write() as (conn, seq):
            work = self._work(conn, info, info.key, now, None, {})
            config_id = work.note(info, event_time=False)
            work.load(record.annotation_id for record in records)
            work.load_tasks(record.task_id for record in records)
            for record in records:
                outcomes[work.upsert(record, config_id, seq, source, listed_at_seq)] += 1
            work.flush(seq)
        return ApplyCounts(
            inserted=outcomes[INSERTED], updated=outcomes[UPDATED], unchanged=outcomes[UNCHANGED],
            tombstoned=outcomes[BURIED],
        )

    def delete_annotations(self, project_key: str, ids: Iterable[int]) -> int:
        """Delete annotations by id, leaving tombstones, in one transaction."""
        ids = sorted(set(ids))
        if not ids:
            return 0
        with self._write() as (conn, seq):
            work = self._work(conn, None, project_key, time.time(), None, {})
            work.load(ids)
            deleted = sum(work.delete(annotation_id) for annotation_id in ids)
            work.flush(seq)
        return deleted

    def note_setup(self, key: str, label_config: str | None = None, hostname: str | None = None,
                   access_token: str | None = None) -> None:
        """Remember what ``/setup`` told us: the project, its config, and how to reach Label Studio."""
        head = key.split(".", 1)[0]
        if not head.isdecimal():
            return
        now = time.time()
        with self._write() as (conn, _seq):
            row = self._project_row(conn, key)
            if row is None:
                conn.execute(
                    projects.insert().values(
                        key=key, ls_id=int(head), title="", created_at="", first_seen=now,
                        last_seq=0, trained_seq=0, live_annotations=0, pending_tasks=0,
                    )
                )
                row = self._project_row(conn, key)
            values = {}
            url = hostname.rstrip("/") if hostname else None
            if url and url != row.ls_url:
                values["ls_url"] = url
                # a token is only ever sent to the address it came with: a new address without a
                # token of its own (Label Studio always sends both) must not receive the old one
                values["ls_token"] = None
            if access_token and (access_token != row.ls_token or "ls_token" in values):
                values["ls_token"] = access_token
            if values:
                conn.execute(projects.update().where(projects.c.key == key).values(**values))
            if label_config and row.label_config_id is None:
                work = _ProjectWork(self, conn, row, now, None)
                work.snapshot(label_config, None)
                conn.execute(projects.update().where(projects.c.key == key).values(**work.values))

    def mark_trained(self, project_key: str, seq: int, full_lane: bool = True) -> None:
        """Training used every change up to ``seq`` (the marks only move forward): the project's
        mark, and where a full-lane job trained (``full_lane``) the full lane's own too."""
        with self._write() as (conn, _seq):
            row = self._project_row(conn, project_key)
            if row is None:
                raise UnknownProject(f"no project {project_key!r} in the store")
            if full_lane and seq > (row.full_trained_seq if row.full_trained_seq is not None else -1):
                conn.execute(projects.update().where(projects.c.key == project_key).values(full_trained_seq=seq))
            if seq > row.trained_seq:
                pending = conn.execute(
                    sa.select(sa.func.count()).where(
                        task_changes.c.project_key == project_key, task_changes.c.last_seq > seq
                    )
                ).scalar_one()
                conn.execute(
                    projects.update().where(projects.c.key == project_key).values(trained_seq=seq, pending_tasks=pending)
                )

    def claim_sync(self, project_key: str, lease_s: float) -> str | None:
        """Take the project's sync lease unless another process holds a live one: the lease's
        holder (``lease_holder``; pass it to ``finish_sync``), or None.  A lease runs out after
        ``lease_s``; one whose holder is a process of this machine that is gone (killed with
        SIGKILL, by the OOM killer) is free at once."""
        now = time.time()
        holder = lease_holder()
        with self._write() as (conn, _seq):
            free = sa.or_(projects.c.sync_lease_until.is_(None), projects.c.sync_lease_until < now)
            result = conn.execute(
                projects.update().where(projects.c.key == project_key, free)
                .values(sync_lease_until=now + lease_s, sync_lease_holder=holder)
            )
            if result.rowcount == 1:
                return holder
            row = self._project_row(conn, project_key)
            if row is None:
                return holder  # no such project yet: nothing to guard
            held_by = row.sync_lease_holder
            if held_by and holder_gone(held_by):
                # taken from the dead holder only: another process may take it at the same moment
                result = conn.execute(
                    projects.update().where(projects.c.key == project_key, projects.c.sync_lease_holder == held_by)
                    .values(sync_lease_until=now + lease_s, sync_lease_holder=holder)
                )
                if result.rowcount == 1:
                    log.info("project %s: the sync lease of %s, a process that is gone, taken over", project_key,
                             held_by)
                    return holder
            return None  # another process holds the lease

    def record_sync(self, project_key: str, report: dict) -> None:
        """Keep a sync's report for the operator view."""
        with self._write() as (conn, _seq):
            conn.execute(
                projects.update().where(projects.c.key == project_key).values(last_sync=canonical_json(report))
            )

    def last_sync(self, project_key: str) -> dict | None:
        """The report of the project's last sync (None: none yet, or no such project)."""
        with self._read() as conn:
            raw = conn.execute(sa.select(projects.c.last_sync).where(projects.c.key == project_key)).scalar()
        return json.loads(raw) if raw else None

    def finish_sync(self, project_key: str, report: dict | None = None, holder: str | None = None) -> None:
        """Release the sync lease and keep the report for the operator view.  With ``holder`` (what
        ``claim_sync`` gave), only that holder's lease: one that ran out and was taken since by
        another sync stays that sync's."""
        with self._write() as (conn, _seq):
            if report is not None:
                conn.execute(
                    projects.update().where(projects.c.key == project_key).values(last_sync=canonical_json(report))
                )
            mine = projects.c.key == project_key
            if holder is not None:
                mine = sa.and_(mine, projects.c.sync_lease_holder == holder)
            conn.execute(projects.update().where(mine).values(sync_lease_until=None, sync_lease_holder=None))

    # -- reads ------------------------------------------------------------------------
    def global_seq(self) -> int:
        with self._read() as conn:
            return conn.execute(sa.select(store_meta.c.value).where(store_meta.c.name == "seq")).scalar_one()

    def current_seq(self, project_key: str) -> int:
        with self._read() as conn:
            value = conn.execute(sa.select(projects.c.last_seq).where(projects.c.key == project_key)).scalar()
        return int(value or 0)

    def trained_seq(self, project_key: str) -> int:
        with self._read() as conn:
            value = conn.execute(sa.select(projects.c.trained_seq).where(projects.c.key == project_key)).scalar()
        return int(value or 0)

    def changes_since(self, project_key: str, seq: int) -> int:
        """Tasks whose training-relevant annotations changed (insert, update, delete) after ``seq``."""
        with self._read() as conn:
            return self._changes_since(conn, project_key, seq)

    @staticmethod
    def _changes_since(conn: Connection, project_key: str, seq: int) -> int:
        return int(
            conn.execute(
                sa.select(sa.func.count()).where(
                    task_changes.c.project_key == project_key, task_changes.c.last_seq > seq
                )
            ).scalar_one()
        )

    def labels_since_full_training(self, project_key: str) -> int:
        """Tasks changed past the full lane's own mark (every labeled task where no full-lane job has
        trained yet): what the full lane has not seen, whatever the fast lane refitted on."""
        with self._read() as conn:
            mark = conn.execute(sa.select(projects.c.full_trained_seq).where(projects.c.key == project_key)).scalar()
            return self._changes_since(conn, project_key, int(mark or 0))

    def labels_since_training(self, project_key: str) -> int:
        """``changes_since(trained_seq)``, kept as a count: one row read, cheap enough for every webhook."""
        with self._read() as conn:
            value = conn.execute(sa.select(projects.c.pending_tasks).where(projects.c.key == project_key)).scalar()
        return int(value or 0)

    def stored_annotations(self, project_key: str) -> int:
        """Live, non-cancelled annotations (what Label Studio calls ``total_annotations_number``)."""
        with self._read() as conn:
            value = conn.execute(sa.select(projects.c.live_annotations).where(projects.c.key == project_key)).scalar()
        return int(value or 0)

    def annotation_ids(self, project_key: str, up_to_seq: int | None = None) -> set[int]:
        """Ids of the live annotations (cancelled included), optionally only those last changed at or before a seq."""
        query = sa.select(annotations.c.annotation_id).where(annotations.c.project_key == project_key)
        if up_to_seq is not None:
            query = query.where(annotations.c.seq <= up_to_seq)
        with self._read() as conn:
            return set(conn.execute(query).scalars())

    def config_mark(self, project_key: str) -> tuple:
        """What orders the project's label config now (its stamp and hash; ``(None, None)`` when
        none is held): a sync takes it before reading the project (``ProjectInfo.held_at_read``)."""
        with self._read() as conn:
            row = conn.execute(
                sa.select(projects.c.config_updated_us, projects.c.label_config_hash).where(projects.c.key == project_key)
            ).one_or_none()
        return (row.config_updated_us, row.label_config_hash) if row else (None, None)

    def latest_label_config(self, project_key: str) -> str | None:
        with self._read() as conn:
            return conn.execute(
                sa.select(label_configs.c.xml)
                .select_from(projects.join(label_configs, label_configs.c.id == projects.c.label_config_id))
                .where(projects.c.key == project_key)
            ).scalar_one_or_none()

    def connection_of(self, project_key: str) -> tuple[str | None, str | None]:
        """Label Studio's address and the token ``/setup`` sent for this project (either may be None)."""
        with self._read() as conn:
            row = conn.execute(
                sa.select(projects.c.ls_url, projects.c.ls_token).where(projects.c.key == project_key)
            ).one_or_none()
        return (row.ls_url, row.ls_token) if row else (None, None)

    def resolve_project(self, key_or_id: str) -> str:
        """A stored project key from a key or a bare Label Studio id (when only one project has it)."""
        text = str(key_or_id).strip()
        if not text.isprintable() or len(text) > 200:  # no stored key is (PostgreSQL refuses a NUL outright)
            raise UnknownProject(f"no project {text[:200]!r} in the store (a key is printable text)")
        with self._read() as conn:
            if conn.execute(sa.select(projects.c.key).where(projects.c.key == text)).scalar_one_or_none():
                return text
            known = conn.execute(sa.select(projects.c.key).order_by(projects.c.key)).scalars().all()
            if text.isdecimal() and int(text) < 2**63:  # a Label Studio id fits a signed 64-bit column
                matches = conn.execute(
                    sa.select(projects.c.key).where(projects.c.ls_id == int(text)).order_by(projects.c.key)
                ).scalars().all()
                if len(matches) == 1:
                    return matches[0]
                if len(matches) > 1:
                    raise UnknownProject(
                        f"Label Studio project id {text} is ambiguous here: it names {', '.join(matches)} "
                        "(projects of several Label Studio instances); pass the full key",
                        ambiguous=True,
                    )
        shown = ", ".join(known[:20]) or "none yet"
        raise UnknownProject(f"no project {text!r} in the store (known: {shown})")

    def _rows(self, conn: Connection, project_key: str, cancelled: bool = False) -> list[Any]:
        query = sa.select(
            annotations.c.annotation_id,
            annotations.c.task_id,
            annotations.c.task_data,
            annotations.c.result,
            annotations.c.annotator,
            annotations.c.ground_truth,
            annotations.c.updated_us,
            annotations.c.seq,
        ).where(annotations.c.project_key == project_key)
        if not cancelled:
            query = query.where(annotations.c.was_cancelled.is_(False))
        return conn.execute(query.order_by(annotations.c.task_id, annotations.c.annotation_id)).all()

    def training_examples(self, project_key: str, control: ControlSpec) -> list[Example]:
        """One example per task for a Choices control (see the rule in the module docstring)."""
        if control.kind != CHOICES:
            return []  # Labels (NER) examples come with the NER trainer; see annotation_results
        with self._read() as conn:
            rows = self._rows(conn, project_key)
        return self._examples(project_key, control, rows)

    def _examples(
        self, project_key: str, control: ControlSpec, rows: Sequence[Any], quiet: bool = False
    ) -> list[Example]:
        allowed = control.values
        dropped: Counter[str] = Counter()
        no_text = ambiguous = 0
        by_task: dict[int, list[tuple[Any, tuple[str, ...]]]] = defaultdict(list)
        for row in rows:
            chosen = _choices_of(json.loads(row.result), control.name)
            if not chosen:
                continue
            kept = tuple(value for value in allowed if value in chosen)
            dropped.update(value for value in chosen if value not in allowed)
            if len(kept) > 1 and not control.multiple:
                # made under choice="multiple" (or imported): which one a single choice means is unknown,
                # and the first in config order would train as if the annotator had said it alone
                ambiguous += 1
                continue
            if kept:
                by_task[row.task_id].append((row, kept))
        examples = []
        for task_id, entries in by_task.items():
            labels = {row.annotation_id: kept for row, kept in entries}
            chosen_row = resolve_task([row for row, _ in entries], lambda row: labels[row.annotation_id])
            text = field_value(json.loads(chosen_row.task_data), control.field)
            if not isinstance(text, str):
                no_text += 1
                continue
            examples.append(
                Example(
                    task_id=task_id,
                    text=text,
                    labels=labels[chosen_row.annotation_id],
                    annotation_id=chosen_row.annotation_id,
                    seq=chosen_row.seq,
                )
            )
        say = log.debug if quiet else log.info
        if dropped:
            say(
                "project %s control %s: %d label(s) no longer in the label config dropped from training: %s",
                project_key, control.name, sum(dropped.values()),
                ", ".join(f"{label!r} x{n}" for label, n in dropped.most_common()),
            )
        if no_text:
            say("project %s control %s: %d task(s) skipped: no text in data field %r",
                     project_key, control.name, no_text, control.field)
        if ambiguous:
            say("project %s control %s: %d annotation(s) with several choices left out: the control takes one "
                "choice now (choice=\"multiple\" when they were made?)", project_key, control.name, ambiguous)
        examples.sort(key=lambda example: example.task_id)
        return examples

    def annotation_results(
        self, project_key: str, control_name: str, field: str | None = None, include_empty: bool | str = False
    ) -> list[tuple[int, str, list[dict]]]:
        """Raw result items per task for one control: ``(task_id, text, items)``.

        The task's latest ground-truth annotation holding items for the control, else its
        latest one.  ``field`` is the task data key of the text; by default it is read from
        the project's current label config.  With ``include_empty``, an annotation without
        items for the control counts too (a text with no entity is a negative example for
        NER): every annotated task appears, with the items of the annotation chosen by the
        same rule (possibly none).  With ``include_empty="since_first"``, only annotations
        last updated no earlier than the first one holding items for the control count
        without items (the ones before were made with no such control in mind, as under an
        earlier label config without it).
        """
        with self._read() as conn:
            rows = self._rows(conn, project_key)
        if field is None:
            field = self._field_of(project_key, control_name)
        return self._results(rows, control_name, field, include_empty)

    def _task_ids(self, project_key: str, cancelled: bool) -> set[int]:
        with self._read() as conn:
            return set(conn.execute(
                sa.select(annotations.c.task_id).distinct().where(
                    annotations.c.project_key == project_key, annotations.c.was_cancelled.is_(cancelled)
                )
            ).scalars().all())

    def skipped_task_ids(self, project_key: str) -> set[int]:
        """Tasks with a live cancelled (skipped) annotation: Label Studio's "unlabeled" filter leaves them out too."""
        return self._task_ids(project_key, cancelled=True)

    def deleted_task_ids(self, project_key: str, since: float | None = None) -> set[int]:
        """Tasks ``TASKS_DELETED`` named (at or after ``since``, a Unix time, where given: a task
        listed after its id was deleted is a new task under that id, which Label Studio on SQLite
        gives the next task after the last one was deleted)."""
        query = sa.select(deleted_tasks.c.task_id).where(deleted_tasks.c.project_key == project_key)
        if since is not None:
            query = query.where(deleted_tasks.c.deleted_at >= since)
        with self._read() as conn:
            return set(conn.execute(query).scalars().all())

    def annotated_task_ids(self, project_key: str) -> set[int]:
        """Tasks with a live annotation that is not a skip, whichever controls it answers."""
        return self._task_ids(project_key, cancelled=False)

    def _field_of(self, project_key: str, control_name: str) -> str | None:
        config = self.latest_label_config(project_key)
        if not config:
            return None
        try:
            return plan_for(config).control(control_name).field
        except (UnsupportedConfig, KeyError):
            return None

    @staticmethod
    def _results(
        rows: Sequence[Any], control_name: str, field: str | None, include_empty: bool | str = False
    ) -> list[tuple[int, str, list[dict]]]:
        by_task: dict[int, list[tuple[Any, list[dict]]]] = defaultdict(list)
        parsed = [
            (row, [item for item in json.loads(row.result) if isinstance(item, dict) and item.get("from_name") == control_name])
            for row in rows
        ]
        since = None
        if include_empty == "since_first":
            since = min((row.updated_us for row, items in parsed if items), default=None)
        for row, items in parsed:
            if items or (include_empty and (since is None or row.updated_us >= since)):
                by_task[row.task_id].append((row, items))
        out = []
        for task_id, entries in sorted(by_task.items()):
            truth = [entry for entry in entries if entry[0].ground_truth]
            row, items = max(truth or entries, key=lambda entry: (entry[0].updated_us, entry[0].annotation_id))
            text = field_value(json.loads(row.task_data), field) if field else None
            out.append((task_id, text if isinstance(text, str) else "", items))
        return out

    def projects(self) -> list[ProjectSummary]:
        with self._read() as conn:
            keys = conn.execute(sa.select(projects.c.key).order_by(projects.c.ls_id, projects.c.key)).scalars().all()
        return [self.project_summary(key) for key in keys]

    def project_summary(self, key: str) -> ProjectSummary:
        with self._read() as conn:
            row = self._project_row(conn, key)
            if row is None:
                raise UnknownProject(f"no project {key!r} in the store")
            rows = self._rows(conn, key)
            cancelled = conn.execute(
                sa.select(sa.func.count()).where(annotations.c.project_key == key, annotations.c.was_cancelled.is_(True))
            ).scalar_one()
            deleted = conn.execute(sa.select(sa.func.count()).where(tombstones.c.project_key == key)).scalar_one()
            configs = conn.execute(sa.select(sa.func.count()).where(label_configs.c.project_key == key)).scalar_one()
            since = int(row.pending_tasks)
            config = None
            if row.label_config_id is not None:
                config = conn.execute(
                    sa.select(label_configs.c.xml).where(label_configs.c.id == row.label_config_id)
                ).scalar_one()
        return ProjectSummary(
            key=key,
            ls_id=row.ls_id,
            title=row.title,
            last_event_at=_iso(row.last_event_at),
            annotations=len(rows),
            cancelled=int(cancelled),
            deleted=int(deleted),
            tasks=len({r.task_id for r in rows}),
            labels=self._label_counts(key, config, rows),
            current_seq=int(row.last_seq),
            trained_seq=int(row.trained_seq),
            labels_since_training=since,
            label_studio_annotations=row.ls_annotations,
            label_configs=int(configs),
            last_sync=json.loads(row.last_sync) if row.last_sync else None,
        )

    def _label_counts(self, key: str, config: str | None, rows: Sequence[Any]) -> dict[str, dict[str, int]]:
        if not config:
            return {}
        try:
            plan = plan_for(config)
        except UnsupportedConfig:
            return {}
        counts: dict[str, dict[str, int]] = {}
        for control in plan.controls:
            tally: Counter[str] = Counter()
            if control.kind == CHOICES:
                for example in self._examples(key, control, rows, quiet=True):
                    tally.update(example.labels)
            elif control.kind == LABELS:
                for _task, _text, items in self._results(rows, control.name, control.field):
                    for item in items:
                        tally.update(region_labels(item.get("value")))
            counts[control.name] = {label: tally.get(label, 0) for label in control.values}
            counts[control.name].update({label: n for label, n in tally.items() if label not in control.values})
        return counts


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]

