"""Training jobs: triggers, coalescing, status — a thin layer over rq, or an embedded runner.

Two queues with one interface (:class:`TrainingQueue`):

- :class:`RedisTrainingQueue` (``REDIS_URL`` set): rq on Redis.  ``ls-backend worker``
  processes on any machine run the jobs; ``ls-backend scheduler`` queues
  ``TRAIN_SCHEDULE``'s jobs (:func:`run_rq_scheduler`).
- :class:`EmbeddedTrainingQueue` (no ``REDIS_URL``): a small SQLite job table in
  ``MODEL_DIR/jobs.sqlite`` and exactly one :class:`JobRunner` per ``MODEL_DIR``
  (an flock), started by ``ls-backend serve`` beside the web workers; each job runs
  in a child process, so a crash or a timeout never takes the runner down.

Coalescing (both): at most one queued job per project and lane.  A job records the store's
change sequence it trains up to (its cut-off) and marks it when it ends; labels arriving
during a run queue no job of their own (the count still holds the running job's labels), and
the job queues the next one when it ends with ``TRAIN_EVERY`` labels past its cut-off.  Other
triggers (Start Training, the schedule, by hand) queue behind a running job.  Redis keys:
``<queue>:queued:<project>`` (the queued job's id), ``<queue>:lock:<project>`` (the
running job), ``<queue>:jobs:<project>`` and ``<queue>:jobs`` (job ids by time).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import logging
import multiprocessing
import os
import re
import signal
import sqlite3
import sys
import threading
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterator

from .registry import safe_key, write_atomic
from .settings import Settings

log = logging.getLogger(__name__)

QUEUED, RUNNING, FINISHED, FAILED = "queued", "running", "finished", "failed"
#: Two lanes, so a seconds-fast head refit never waits behind a full fine-tune:
#: "fast" refits the heads on frozen (cached) embeddings; "full" runs TRAIN_MODE's candidates.
FAST, FULL = "fast", "full"
LANES = (FAST, FULL)
#: Lanes whose next job process the embedded runner starts ahead, while the lane waits: the
#: process imports torch, transformers and the encoder's classes before its job arrives
#: (:func:`warm_imports`; 6-8 s of every fast-lane job on two CPU cores).  The full lane's jobs
#: take minutes, so a process idling for them would hold memory for nothing.  ``JOB_STANDBY=false``
#: turns it off.
STANDBY_LANES = (FAST,)
LOCK_TTL = 60  # seconds; a running job renews its project lock every LOCK_TTL / 3
QUEUED_MARKER_TTL = 7 * 86400  # seconds; a queued job's marker, and a finished job's result


@dataclass
class JobInfo:
    id: str
    project: str
    state: str
    trigger: str
    enqueued_at: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    progress: dict = field(default_factory=dict)
    result: dict | None = None
    error: str | None = None
    attempts: int = 0
    lane: str = FULL

    @property
    def duration(self) -> float | None:
        if self.started_at is None:
            return None
        return round((self.ended_at or time.time()) - self.started_at, 2)

    def to_dict(self) -> dict:
        body = asdict(self)
        body["duration"] = self.duration
        body["version"] = (self.result or {}).get("version")
        return body


REFRESH_TRIGGER = "refresh"  # a job that only refreshes the predictions (GET /projects/<key>/next)
SYNC_TRIGGER = "START_TRAINING"  # the job syncs the project from Label Studio before it trains


def split_trigger(trigger: str) -> tuple[str, bool]:
    """(what trains, whether to refresh the predictions at the end whatever the outcome):
    ``labels`` -> ("labels", False); ``refresh`` -> ("", True); ``labels+refresh`` -> ("labels", True)."""
    if trigger == REFRESH_TRIGGER:
        return "", True
    base, plus, extra = trigger.partition("+")
    return base, bool(plus) and extra == REFRESH_TRIGGER


def merge_triggers(queued: str, new: str) -> str:
    """The trigger of a queued job once a request with trigger ``new`` joins it.  A training
    request never disappears into a refresh-only job: the job trains, and still refreshes at the
    end (promoted or not); a refresh request joining a training job makes it refresh at the end
    too; Start Training's sync is kept; otherwise the queued job's trigger stands."""
    queued_base, queued_refresh = split_trigger(queued)
    new_base, new_refresh = split_trigger(new)
    base = new_base if not queued_base or new_base == SYNC_TRIGGER else queued_base
    refresh = queued_refresh or new_refresh
    if not base:
        return REFRESH_TRIGGER
    return f"{base}+{REFRESH_TRIGGER}" if refresh else base


def _job_id(project_key: str) -> str:
    """``train-<project key with '.' as '_'>-<random>``: letters, digits, '_' and '-' only (rq's rule)."""
    readable = "".join(c if c.isalnum() else "_" for c in project_key)[:60]
    return f"train-{readable}-{uuid.uuid4().hex[:12]}"


# -- the job itself -----------------------------------------------------------------
def execute_training(settings: Settings, project_key: str, trigger: str, progress=None, lane: str = FULL) -> dict:
    """Run one fine-tuning job for a project (what every worker kind calls); after a promotion,
    refresh the project's predictions in Label Studio (``ls_backend.refresh``).  The trigger
    ``refresh`` runs only the refresh."""
    from .finetune import FineTuneJob, NothingToTrain
    from .refresh import refresh_predictions, unfinished_refresh
    from .store import CorrectionStore

    from .model import resolve_device
    from .precision import cap_gpu_memory

    if cap_gpu_memory(resolve_device(settings.device), settings.train_gpu_memory_fraction):
        log.info("training jobs may use %.0f%% of the GPU's memory", 100 * settings.train_gpu_memory_fraction)
    store = CorrectionStore.from_settings(settings)
    try:
        base, refresh_anyway = split_trigger(trigger)
        if not base:
            return refresh_predictions(settings, store, project_key, progress, raise_errors=True)
        if base == SYNC_TRIGGER:
            _sync_before_training(settings, store, project_key)
        try:
            mode = "frozen" if lane == FAST else None
            result = FineTuneJob(settings, store, progress=progress, mode=mode).run(project_key, base)
        except NothingToTrain as exc:
            log.info("project %s: nothing to train: %s", project_key, exc)
            result = {"project": project_key, "version": None, "promoted": False, "reason": f"nothing to train: {exc}",
                      "cutoff_seq": exc.cutoff_seq}
        # a new version goes live: Label Studio's ordering follows it; a refresh asked for
        # while the job was queued runs whatever the outcome, and so does the served version's
        # refresh that a killed job left unfinished (its retry resumes it)
        if result.get("promoted") or refresh_anyway or unfinished_refresh(settings, project_key):
            result["refresh"] = refresh_predictions(settings, store, project_key, progress)
        return result
    finally:
        store.close()
        _prune_embedding_cache(settings)  # (after every job: a refresh or a failed one too)


def _prune_embedding_cache(settings: Settings) -> None:
    """At most once a day, drop this machine's cached embeddings of encoders unused for
    ``CACHE_MAX_AGE_DAYS``, then the oldest rows past ``CACHE_MAX_ROWS`` (a cache: a failure here
    costs nothing but disk)."""
    from .embeddings import EmbeddingCache, cache_file

    if (settings.cache_max_age_days <= 0 and settings.cache_max_rows <= 0) or not cache_file(settings.local_cache_dir).exists():
        return
    try:
        removed = EmbeddingCache(settings.local_cache_dir).prune_daily(
            settings.cache_max_age_days * 86_400, max_rows=settings.cache_max_rows)
    except Exception as exc:
        log.warning("the embedding cache was not pruned: %s", exc)
        return
    unused = [r for r in removed or [] if r.reason == "unused"]
    capped = [r for r in removed or [] if r.reason == "cap"]
    if unused:
        log.info("embedding cache: removed %d rows of %d encoders unused for %g days",
                 sum(r.rows for r in unused), len(unused), settings.cache_max_age_days)
    if capped:
        log.info("embedding cache: removed the %d rows written longest ago, past CACHE_MAX_ROWS=%d",
                 sum(r.rows for r in capped), settings.cache_max_rows)


#: how long a job waits for a sync of its project that another process runs (the web worker's, on
#: the same START_TRAINING) before it lists Label Studio itself all the same
SYNC_WAIT_S = 300.0


def _sync_before_training(settings: Settings, store, project_key: str) -> None:
    """Bring the store level with Label Studio first, where its API is reachable.  Under the
    project's sync lease: the button that queued this job also started a sync in a web worker,
    and two full listings at once only load Label Studio; where that sync ends while the job waits
    for the lease, its result is the job's (it listed Label Studio after the button was pressed)."""
    from .sync import LEASE_S, sync_project

    asked = time.time()
    deadline = time.monotonic() + SYNC_WAIT_S
    claimed = store.claim_sync(project_key, LEASE_S)  # (its holder; free at once where the holder died)
    while claimed is None and time.monotonic() < deadline:
        time.sleep(0.5)
        claimed = store.claim_sync(project_key, LEASE_S)
    try:
        if claimed:
            last = store.last_sync(project_key)
            if last and float(last.get("finished_at") or 0) >= asked:
                log.info("project %s: a sync that ended while the job waited (%s) is the job's", project_key,
                         last.get("reason"))
                return
        else:
            log.warning("project %s: a sync has held the project for over %.0f s; syncing all the same",
                        project_key, SYNC_WAIT_S)
        sync_project(store, settings, project_key, reason="START_TRAINING")
    except Exception as exc:  # the labels we hold are still worth training on
        log.warning("project %s: sync before training failed: %s", project_key, exc)
    finally:
        if claimed:
            store.finish_sync(project_key, holder=claimed)


class Throttled:
    """Calls ``sink`` with progress updates, at most every ``every`` seconds (and the last one)."""

    def __init__(self, sink, every: float = 1.0):
        self.sink, self.every, self.last = sink, every, 0.0

    def __call__(self, update: dict) -> None:
        now = time.monotonic()
        final = update.get("step") is not None and update.get("step") == update.get("steps")
        if final or now - self.last >= self.every:
            self.last = now
            try:
                self.sink(dict(update, at=time.time()))
            except Exception:
                log.debug("progress update lost", exc_info=True)


def redis_unreachable() -> tuple[type[BaseException], ...]:
    """The errors of a Redis that does not answer (down, restarting): waited out or reported as
    such (a 503), never taken for an answer about a job."""
    from redis.exceptions import ConnectionError as RedisConnectionError, TimeoutError as RedisTimeoutError

    return RedisConnectionError, RedisTimeoutError


# -- interface ---------------------------------------------------------------------
class TrainingQueue(ABC):
    def __init__(self, settings: Settings):
        self.settings = settings

    @abstractmethod
    def enqueue(self, project_key: str, trigger: str, lane: str = FULL) -> tuple[JobInfo, bool]:
        """Queue a job for the project in ``lane`` unless one is queued there already: (job, created)."""

    @abstractmethod
    def jobs(self, project_key: str | None = None, limit: int = 50) -> list[JobInfo]:
        """Jobs, newest first."""

    @abstractmethod
    def get(self, job_id: str) -> JobInfo | None: ...

    #: errors of the queue's server that pass (Redis restarting): ``wait`` reads again
    transient_errors: tuple[type[BaseException], ...] = ()

    def wait(self, job_id: str, timeout: float, poll: float = 0.5) -> JobInfo:
        deadline = time.monotonic() + timeout
        while True:
            try:
                job = self.get(job_id)
            except self.transient_errors as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("job %s: the queue does not answer (%s); reading again", job_id, exc)
                time.sleep(max(poll, 2.0))
                continue
            if job is None:
                raise LookupError(f"no job {job_id}")
            handed = _RETRIED_AS.search(job.error or "") if job.state == FAILED else None
            if handed and time.monotonic() <= deadline:  # a job queued meanwhile is its retry: follow the work
                log.info("job %s failed and was retried as %s: waiting for that one", job_id, handed[1])
                job_id = handed[1]
                continue
            if job.state in (FINISHED, FAILED) or time.monotonic() > deadline:
                return job
            time.sleep(poll)

    @staticmethod
    def labels_behind(store, project_key: str, result, lane: str = FULL) -> int:
        """Labels changed past the cut-off of the job that ``result`` ended; where it has none (a
        refresh-only job), past the lane's mark: the full lane's own, the project's for the fast
        lane.  A lane's own cut-off, not the project's mark: the fast lane's jobs beside a full-lane
        one move the mark past labels the full lane never saw (and a refresh-only job in the full
        lane, which label triggers wait behind, would then queue nothing for them)."""
        cutoff = result.get("cutoff_seq") if isinstance(result, dict) else None
        if cutoff is None:
            return store.labels_since_full_training(project_key) if lane == FULL else store.labels_since_training(project_key)
        return store.changes_since(project_key, int(cutoff))

    def requeue_if_behind(self, project_key: str, lane: str = FULL, result: dict | None = None) -> None:
        """At the end of a job (``result``): queue the lane's next one at once where ``TRAIN_EVERY``
        labels or more came past its cut-off while it ran (they queued nothing themselves)."""
        every = self.settings.train_every
        if not every:
            return
        from .store import CorrectionStore

        store = CorrectionStore.from_settings(self.settings)
        try:
            if self.labels_behind(store, project_key, result, lane) >= every and lane in self.label_lanes(store, project_key):
                self.enqueue(project_key, "labels", lane)
        finally:
            store.close()

    def seq_now(self, project_key: str) -> int | None:
        """The project's last write in the store now (a job's start, for :meth:`requeue_after_failure`);
        None where the store cannot be read."""
        from .store import CorrectionStore

        try:
            store = CorrectionStore.from_settings(self.settings)
            try:
                return store.current_seq(project_key)
            finally:
                store.close()
        except Exception:
            log.warning("project %s: could not read the store's position", project_key, exc_info=True)
            return None

    def requeue_after_failure(self, project_key: str, lane: str, started_seq: int | None) -> None:
        """At the end of a job that failed for good: the labels that came while it ran queued nothing
        (they waited for it), so queue the lane's next job where ``TRAIN_EVERY`` of them came (the
        labels from before it do not count: a job that fails every time is not run again and again
        for them alone)."""
        if started_seq is None:
            return
        try:
            self.requeue_if_behind(project_key, lane, {"cutoff_seq": started_seq})
        except Exception:
            log.exception("project %s: after a failed job, could not check for labels that came meanwhile", project_key)

    def label_lanes(self, store, project_key: str) -> list[str]:
        """The lanes a label trigger feeds: the fast lane, and the full lane under TRAIN_MODE=full
        or, under auto, once the project holds FULL_MIN_LABELS labels (coalesced like any job)."""
        mode = self.settings.train_mode
        if mode == "full":
            return [FULL]
        if mode == "auto" and store.stored_annotations(project_key) >= self.settings.full_min_labels:
            return [FAST, FULL]
        return [FAST]

    def maybe_enqueue(self, store, outcome) -> JobInfo | None:
        """Webhook hook: START_TRAINING always queues a full-lane job; labels queue every ``TRAIN_EVERY``."""
        key = getattr(outcome, "project_key", None)
        if not key:
            return None
        if getattr(outcome, "trigger", False):
            return self.enqueue(key, "START_TRAINING", FULL)[0]
        every = self.settings.train_every
        if not every or not getattr(outcome, "changed", 0):
            return None
        pending = getattr(outcome, "labels_since_training", None)  # counted by the write itself
        if pending is None:
            pending = store.labels_since_training(key)
        if pending >= every:
            # a lane whose job is running now queues nothing: the count still holds the labels that
            # job took (its cut-off is marked when it ends), so one more label would queue a whole job
            # for itself; the job queues the next one when it ends with TRAIN_EVERY labels past its
            # cut-off (``requeue_if_behind``), and it ends before the next could start anyway
            lanes = [lane for lane in self.label_lanes(store, key) if not self.running(key, lane)]
            jobs = [self.enqueue(key, "labels", lane)[0] for lane in lanes]
            return jobs[0] if jobs else None
        return None

    @abstractmethod
    def running(self, project_key: str, lane: str) -> bool:
        """Whether a job of the project and lane is running now."""

    def close(self) -> None:
        pass


#: how both queues end the error of a failed job whose retry is another job (one queued meanwhile)
_RETRIED_AS = re.compile(r"\(retried as ([A-Za-z0-9_-]+)\)$")


def queue_from_settings(settings: Settings) -> TrainingQueue:
    if settings.redis_url:
        return RedisTrainingQueue(settings)
    return EmbeddedTrainingQueue(settings)


def scheduled_training(project_keys: list[str] | None = None) -> list[str]:
    """The scheduled trigger: queue a full-lane job for every project with labels no full-lane job
    has trained on (the fast lane's refits do not count: they never fine-tune)."""
    from .store import CorrectionStore

    settings = Settings.from_env()
    store = CorrectionStore.from_settings(settings)
    queue = queue_from_settings(settings)
    queued = []
    try:
        keys = project_keys or [p.key for p in store.projects()]
        for key in keys:
            if store.labels_since_full_training(key) > 0:
                queue.enqueue(key, "schedule", FULL)
                queued.append(key)
    finally:
        store.close()
        queue.close()
    return queued


# -- rq ---------------------------------------------------------------------------
@contextlib.contextmanager
def renewed_lock(connection, key: str, ttl: float, wait: float, what: str) -> Iterator[None]:
    """Hold the Redis lock ``key`` for the whole block, however long it runs: it expires ``ttl``
    seconds after its holder dies, and a thread renews it every ``ttl / 3`` while the block runs.
    The lock keeps its token in the lock object, not per thread (redis-py's default), so that the
    renewing thread holds it too; with a per-thread token every renewal failed and a job running
    past ``ttl`` lost the lock to the next one."""
    lock = connection.lock(key, timeout=ttl, blocking_timeout=wait, thread_local=False)
    if not lock.acquire():
        raise RuntimeError(f"{what}: another job held the lock for {wait:.0f}s")
    stop = threading.Event()

    def renew() -> None:
        from redis.exceptions import LockNotOwnedError

        while not stop.wait(ttl / 3):
            try:
                try:
                    lock.reacquire()
                except LockNotOwnedError:
                    # it expired while Redis was away longer than the TTL (or a Redis without
                    # persistence came back empty): take it back, or else the next job of the
                    # project would start beside this one
                    if connection.set(key, lock.local.token, nx=True, px=int(ttl * 1000)):
                        log.warning("%s: the lock %s had expired (Redis away?); taken back", what, key)
                    else:
                        log.error("%s: the lock %s expired and another job holds it now: two jobs of the "
                                  "project may run side by side", what, key)
            except Exception as exc:  # Redis away for a moment: try again at the next tick
                log.warning("%s: could not renew the lock %s: %s", what, key, exc)

    threading.Thread(target=renew, daemon=True).start()
    try:
        yield
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            lock.release()


def restart_job_clock(seconds: int) -> bool:
    """In an rq work horse, start rq's timeout for this job (its SIGALRM death penalty) again at
    ``seconds``: the wait for the project's lock must not count against ``JOB_TIMEOUT``.  False
    where there is no such clock (not the main thread, or another death penalty)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    from rq.timeouts import UnixSignalDeathPenalty

    if not isinstance(getattr(signal.getsignal(signal.SIGALRM), "__self__", None), UnixSignalDeathPenalty):
        return False
    signal.alarm(max(1, int(seconds)))
    return True


#: set by ``run_rq_worker`` to its pid, for the work horses it forks
RQ_WORKER_PID = "LS_BACKEND_RQ_WORKER_PID"


def watch_rq_worker() -> bool:
    """In an rq work horse that ``run_rq_worker`` forked: end the horse once its worker is gone.
    rq puts each horse in a process group of its own, so a worker killed hard (SIGKILL, a
    supervisor's killasgroup, the OOM killer) leaves it training and renewing the project's lock
    while rq retries the job it finds abandoned: the retry trained a second time after it.  False
    where this process is no such horse (a job run in the worker's own process)."""
    worker = os.environ.get(RQ_WORKER_PID, "")
    if not worker.isdigit() or int(worker) == os.getpid() or os.getppid() != int(worker):
        return False
    exit_with_parent(int(worker))
    return True


def train_project(project_key: str, trigger: str = "manual", lane: str = FULL) -> dict:
    """The rq job function (``ls_backend.jobs.train_project``)."""
    from redis import Redis
    from rq import get_current_job

    watch_rq_worker()
    settings = Settings.from_env()
    connection = Redis.from_url(settings.redis_url)
    queue = RedisTrainingQueue(settings, connection)
    job = get_current_job()
    with renewed_lock(connection, queue.key(f"lock:{lane}", project_key), LOCK_TTL, settings.job_timeout,
                      f"project {project_key}"):
        # JOB_TIMEOUT counts from here: rq's own timeout is JOB_TIMEOUT plus the longest wait for the lock
        restart_job_clock(settings.job_timeout)
        # from here on, new labels queue the next job instead of joining this one
        queue.release_queued(project_key, job.id if job else None, lane)
        started_seq = queue.seq_now(project_key)
        if job is not None:
            job.meta["started_at"] = time.time()
            job.save_meta()

        def sink(update: dict) -> None:
            if job is not None:
                job.meta["progress"] = update
                job.save_meta()

        try:
            result = execute_training(settings, project_key, trigger, Throttled(sink), lane)
        except BaseException as exc:
            if job is not None and job.should_retry:
                job.meta["last_error"] = f"{type(exc).__name__}: {exc}"[:1000]
                # rq retries this job (after a back-off): triggers meanwhile join the retry, as they
                # join a queued job, instead of queuing a second job that would run beside it; its
                # status says why it waits (rq keeps no result of an attempt it retries)
                if not connection.set(queue.key(f"queued:{lane}", project_key), job.id, nx=True, ex=QUEUED_MARKER_TTL):
                    # a job of the project and lane was queued while this one ran: that one is the
                    # retry, and takes this job's trigger (Start Training's sync, say); rq does not
                    # retry this one, which would train a second time after it
                    successor, _ = queue.enqueue(project_key, trigger, lane)
                    # the attempts it used, before rq is told to use no more (its status counts them)
                    job.meta["attempts_used"] = job.meta.get("retries", settings.job_retries) - job.retries_left + 1
                    job.retries_left = 0
                    job.meta["retried_as"] = successor.id
                job.save_meta()
            else:  # failed for good
                queue.requeue_after_failure(project_key, lane, started_seq)
            raise
    try:
        queue.requeue_if_behind(project_key, lane, result)
    except Exception:  # the job trained and its version is live: a failed look ahead must not fail it (a retry)
        log.exception("project %s: after job %s, could not check for labels past its cut-off", project_key,
                      job.id if job is not None else "-")
    return result


class RedisTrainingQueue(TrainingQueue):
    LIVE = {"queued", "deferred", "scheduled", "started"}

    def __init__(self, settings: Settings, connection=None):
        super().__init__(settings)
        from redis import Redis
        from rq import Queue

        self.transient_errors = redis_unreachable()
        self.connection = connection or Redis.from_url(settings.redis_url)
        self.queues = {lane: Queue(lane_queue_name(settings, lane), connection=self.connection) for lane in LANES}
        self.queue = self.queues[FULL]

    def key(self, kind: str, project_key: str | None = None) -> str:
        base = f"{self.settings.queue_name}:{kind}"
        return f"{base}:{safe_key(project_key)}" if project_key else base

    def release_queued(self, project_key: str, job_id: str | None, lane: str = FULL) -> None:
        key = self.key(f"queued:{lane}", project_key)
        pipe = self.connection.pipeline()
        while True:
            try:
                pipe.watch(key)
                if job_id is not None and (pipe.get(key) or b"").decode() != job_id:
                    pipe.unwatch()
                    return
                pipe.multi()
                pipe.delete(key)
                pipe.execute()
                return
            except Exception as exc:  # WatchError: someone changed it; look again
                if type(exc).__name__ != "WatchError":
                    raise
            finally:
                pipe.reset()

    def enqueue(self, project_key: str, trigger: str, lane: str = FULL) -> tuple[JobInfo, bool]:
        from rq import Retry
        from rq.job import Job

        key = self.key(f"queued:{lane}", project_key)
        # one enqueuer at a time per project and lane: between setting the key and rq writing the job,
        # another enqueuer would find no job behind the key, take it for stale and queue a second one
        with self.connection.lock(self.key(f"enqueue:{lane}", project_key), timeout=30, blocking_timeout=30,
                                  thread_local=False):
            if not self.connection.exists(key):
                self._mark_orphan(project_key, lane, key)
            for _ in range(5):
                job_id = _job_id(project_key)
                # the marker lives as long as the job's result (a week): behind a long queue, a job can wait
                # hours, and an expired marker let the next label queue a second job of the project; a
                # marker whose job ended or vanished is found stale below
                if self.connection.set(key, job_id, nx=True, ex=QUEUED_MARKER_TTL):
                    retries = self.settings.job_retries
                    job = self.queues[lane].enqueue(
                        train_project,
                        project_key,
                        trigger,
                        lane,
                        job_id=job_id,
                        # a job of this project and lane may first wait up to JOB_TIMEOUT for the one
                        # running (``train_project``); its own JOB_TIMEOUT starts once it has the lock
                        job_timeout=2 * self.settings.job_timeout,
                        result_ttl=QUEUED_MARKER_TTL,
                        failure_ttl=30 * 86400,
                        retry=Retry(max=retries, interval=[10, 60, 300][:retries] or 10) if retries else None,
                        meta={"project": project_key, "trigger": trigger, "lane": lane, "enqueued_at": time.time(),
                              "retries": retries},
                        description=f"train {project_key} ({trigger}, {lane} lane)",
                    )
                    now = time.time()
                    pipe = self.connection.pipeline()
                    pipe.zadd(self.key("jobs", project_key), {job_id: now})
                    pipe.zadd(self.key("jobs"), {job_id: now})
                    pipe.execute()
                    log.info("project %s: queued %s-lane job %s (%s)", project_key, lane, job_id, trigger)
                    return self._info(job), True
                existing = self.connection.get(key)
                if existing is None:
                    continue
                existing_id = existing.decode()
                try:
                    job = Job.fetch(existing_id, connection=self.connection)
                    status = job.get_status(refresh=True)
                    status = getattr(status, "value", status)
                except Exception:
                    job, status = None, None
                if status in self.LIVE:
                    queued_trigger = (job.meta or {}).get("trigger", trigger)
                    merged = merge_triggers(queued_trigger, trigger)
                    if merged == queued_trigger:
                        log.debug("project %s: %s coalesced into queued job %s", project_key, trigger, existing_id)
                        return self._info(job), False
                    # the queued job's trigger changes where it stands in the queue, or a retry's while it
                    # waits for its back-off (unless a worker took it first)
                    if status in ("queued", "scheduled") and self._rewrite_queued(job, project_key, merged, lane):
                        log.info("project %s: %s joined queued job %s, now %s", project_key, trigger, existing_id, merged)
                        return self._info(job), False
                self.release_queued(project_key, existing_id, lane)  # stale, or started: queue a new one
            raise RuntimeError(f"project {project_key}: could not queue a job")

    def _mark_orphan(self, project_key: str, lane: str, key: str) -> None:
        """Where no job is marked queued, one may wait all the same: rq retries a job whose worker
        died (found abandoned) by itself, without the marker its start removed.  That job becomes
        the queued one, so the trigger joins it instead of queuing a second training."""
        from rq.job import Job

        for raw in self.connection.zrevrange(self.key("jobs", project_key), 0, 9):
            with contextlib.suppress(Exception):
                job = Job.fetch(raw.decode(), connection=self.connection)
                status = job.get_status(refresh=True)
                if getattr(status, "value", status) in ("queued", "scheduled") and (job.meta or {}).get("lane", FULL) == lane:
                    self.connection.set(key, job.id, nx=True, ex=QUEUED_MARKER_TTL)
                    return

    def _rewrite_queued(self, job, project_key: str, trigger: str, lane: str) -> bool:
        """Give a queued job a new trigger in its place in the queue: one transaction that is tried
        again when the queue changes meanwhile, and gives up (False) once a worker has taken the job.
        (Taking it off the queue and putting it back moved it ahead of, or behind, other projects'
        jobs.)"""
        from redis.exceptions import WatchError

        queue = self.queues[lane]
        scheduled = queue.scheduled_job_registry.key  # a retry waiting for its back-off
        job.func_name  # noqa: B018  (loads the stored call, so that it can be written back)
        for _ in range(50):
            with self.connection.pipeline() as pipe:
                try:
                    pipe.watch(queue.key, scheduled, job.key)
                    if job.id.encode() not in pipe.lrange(queue.key, 0, -1) and pipe.zscore(scheduled, job.id) is None:
                        return False  # a worker took it
                    job.args = (project_key, trigger, lane)
                    job.meta["trigger"] = trigger
                    job.description = f"train {project_key} ({trigger}, {lane} lane)"
                    pipe.multi()
                    job.save(pipeline=pipe)
                    pipe.execute()
                    return True
                except WatchError:  # the queue moved (a job queued or taken): look again
                    continue
        return False

    def running(self, project_key: str, lane: str) -> bool:
        # the lock a running job holds (``train_project``; it expires LOCK_TTL after a dead worker)
        return bool(self.connection.exists(self.key(f"lock:{lane}", project_key)))

    def _info(self, job) -> JobInfo:
        status = job.get_status(refresh=False)
        status = getattr(status, "value", status)
        state = {
            "queued": QUEUED,
            "deferred": QUEUED,
            "scheduled": QUEUED,
            "started": RUNNING,
            "finished": FINISHED,
        }.get(status, FAILED)
        meta = job.meta or {}
        result = None
        error = None
        if state == FINISHED:
            with contextlib.suppress(Exception):
                result = job.return_value()
        if state == FAILED:
            error = self._failure(job) or f"job {status}"
            if meta.get("retried_as"):
                error = f"{error} (retried as {meta['retried_as']})"
        started = meta.get("started_at") or (job.started_at.replace(tzinfo=timezone.utc).timestamp() if job.started_at else None)
        ended = job.ended_at.replace(tzinfo=timezone.utc).timestamp() if job.ended_at else None
        # attempts started, as the embedded queue counts them: rq counts the retries it used
        used = meta.get("retries", self.settings.job_retries) - job.retries_left if job.retries_left is not None else 0
        attempts = used if state == QUEUED else used + 1
        if meta.get("attempts_used"):  # handed over to a job queued while it ran (see ``train_project``)
            attempts = int(meta["attempts_used"])
        progress = meta.get("progress", {})
        if state == QUEUED:  # not started, or waiting for a retry: no start time, progress or duration of its own
            started, progress = None, {}
            if used and meta.get("last_error"):
                error = f"attempt {used} failed: {meta['last_error']}"
        return JobInfo(
            id=job.id,
            project=meta.get("project", ""),
            state=state,
            trigger=meta.get("trigger", ""),
            enqueued_at=meta.get("enqueued_at"),
            started_at=started,
            ended_at=ended if state in (FINISHED, FAILED) else None,
            progress=progress,
            result=result,
            error=error,
            attempts=attempts,
            lane=meta.get("lane", FULL),
        )

    @staticmethod
    def _failure(job) -> str | None:
        with contextlib.suppress(Exception):
            latest = job.latest_result()
            if latest is not None and latest.exc_string:
                return latest.exc_string.strip().splitlines()[-1]
        return getattr(job, "exc_info", None)

    def get(self, job_id: str) -> JobInfo | None:
        from rq.exceptions import NoSuchJobError
        from rq.job import Job

        try:
            return self._info(Job.fetch(job_id, connection=self.connection))
        # only these: Redis not answering is no answer about the job (a 503); rq refuses an id with
        # other characters than letters, digits, "_" and "-" (ValueError), which names no job of ours
        except (NoSuchJobError, ValueError):
            return None

    def jobs(self, project_key: str | None = None, limit: int = 50) -> list[JobInfo]:
        from rq.job import Job

        ids = [i.decode() for i in self.connection.zrevrange(self.key("jobs", project_key), 0, limit - 1)]
        found = Job.fetch_many(ids, connection=self.connection)
        return [self._info(job) for job in found if job is not None]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.connection.close()


def lane_queue_name(settings: Settings, lane: str) -> str:
    return settings.queue_name if lane == FULL else f"{settings.queue_name}-{lane}"


def run_rq_worker(settings: Settings, burst: bool = False, lanes: tuple[str, ...] = (FAST, FULL)) -> int:
    """An rq worker on the given lanes, fast first (a worker busy with a full fine-tune
    takes no fast job: run one ``--lane fast`` worker beside the GPU workers)."""
    from redis import Redis
    from rq import Queue, Worker

    connection = Redis.from_url(settings.redis_url)
    # rq forks a work horse per job from this process: import what the jobs need once, here
    log.info("job imports warmed in %.1f s", warm_imports(settings))
    os.environ[RQ_WORKER_PID] = str(os.getpid())  # the horses it forks watch it (``watch_rq_worker``)
    # a worker that dies (SIGKILL, lost machine) stops heartbeating; its job is found
    # abandoned within about a minute and retried (JOB_RETRIES) or failed with the reason
    worker = Worker(
        [Queue(lane_queue_name(settings, lane), connection=connection) for lane in lanes],
        connection=connection,
        job_monitoring_interval=10,
        maintenance_interval=30,
        worker_ttl=60,  # an idle worker wakes every 45 s, so maintenance really runs
    )
    worker.work(burst=burst, with_scheduler=True, logging_level=settings.log_level)
    return 0


# -- the schedule (TRAIN_SCHEDULE) ---------------------------------------------------
def schedule_after(schedule: str | None, moment: float) -> float | None:
    """The schedule's first slot after ``moment``: ``moment`` plus the seconds, or the cron
    expression's next time (UTC); None without a schedule."""
    if not schedule:
        return None
    if schedule.isdecimal():
        return moment + int(schedule)
    from croniter import croniter

    return croniter(schedule, datetime.fromtimestamp(moment, timezone.utc)).get_next(float)


def slot_mark(schedule: str, due: float, now: float) -> float:
    """What the run of the slot ``due``, firing at ``now``, records as the schedule's last run: the
    slot itself, so that a run that fired late (a busy machine, a slow tick) does not push the next
    ones back; ``now`` where the slot after it has passed too, so that a schedule nobody kept for a
    while runs once, not once per missed slot."""
    following = schedule_after(schedule, due)
    return due if following is not None and following > now else now


def schedule_due(schedule: str, last: float, now: float) -> tuple[float | None, float]:
    """Where the schedule stands at ``now``, its last run at ``last``: the mark to record when a slot
    is due (``slot_mark``) and its run fires, else None; and the seconds until the next look."""
    due = schedule_after(schedule, last)
    if now < due:
        return None, min(due - now, 30.0)
    return slot_mark(schedule, due, now), 0.0


def run_rq_scheduler(settings: Settings) -> int:
    """``ls-backend scheduler`` with Redis: queue the scheduled jobs at each slot of TRAIN_SCHEDULE,
    counted from the schedule's last run, kept in Redis (``<QUEUE_NAME>:schedule-last``): a
    restart neither runs it at once nor pushes it back, and of several schedulers one fires each
    slot.  Redis not answering is waited out."""
    from redis import Redis

    if not settings.train_schedule:
        raise SystemExit("TRAIN_SCHEDULE is not set: nothing to schedule")
    connection = Redis.from_url(settings.redis_url)
    key = f"{settings.queue_name}:schedule-last"
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    log.info("schedule: %s (TRAIN_SCHEDULE), last run kept in Redis at %s", settings.train_schedule, key)
    while not stopping.is_set():
        try:
            wait = rq_schedule_tick(connection, key, settings.train_schedule)
        except redis_unreachable() as exc:
            log.warning("schedule: Redis does not answer (%s); trying again in 10 s", exc)
            wait = 10.0
        except Exception:  # the store down, say: the slot is spent, the next one comes as planned
            log.exception("schedule: the scheduled trigger failed")
            wait = 1.0
        stopping.wait(wait)
    return 0


def rq_schedule_tick(connection, key: str, schedule: str) -> float:
    """Fire the slot that is due, if one is (the scheduler that moves the mark fires it); returns
    the seconds until the next look."""
    from redis.exceptions import WatchError

    # a Redis that holds no mark (new, or flushed): the schedule counts from this first start
    connection.set(key, f"{time.time():.3f}", nx=True)
    with connection.pipeline() as pipe:
        try:
            pipe.watch(key)
            raw = pipe.get(key)
            try:
                last = float(raw)
            except (TypeError, ValueError):
                last = time.time()
            mark, wait = schedule_due(schedule, last, time.time())
            if mark is None:
                return wait
            pipe.multi()
            pipe.set(key, f"{mark:.3f}")
            pipe.execute()
        except WatchError:  # another scheduler fired this slot
            return 1.0
    queued = scheduled_training()
    log.info("schedule: queued %d project(s)", len(queued))
    return 0.0


# -- embedded ------------------------------------------------------------------------
class EmbeddedTrainingQueue(TrainingQueue):
    """A job table in SQLite (``MODEL_DIR/jobs.sqlite``), shared by the web workers and the runner."""

    SCHEMA = """
    CREATE TABLE IF NOT EXISTS jobs (
        id TEXT PRIMARY KEY,
        project TEXT NOT NULL,
        state TEXT NOT NULL,
        trigger TEXT NOT NULL,
        enqueued_at REAL NOT NULL,
        started_at REAL,
        ended_at REAL,
        progress TEXT NOT NULL DEFAULT '{}',
        result TEXT,
        error TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        lane TEXT NOT NULL DEFAULT 'full'
    );
    CREATE INDEX IF NOT EXISTS jobs_project ON jobs (project, state);
    """

    def __init__(self, settings: Settings):
        super().__init__(settings)
        settings.model_dir.mkdir(parents=True, exist_ok=True)
        self.path = settings.model_dir / "jobs.sqlite"
        with self._connect() as db:
            db.executescript(self.SCHEMA)
            columns = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
            if "lane" not in columns:  # tables made before lanes existed
                db.execute("ALTER TABLE jobs ADD COLUMN lane TEXT NOT NULL DEFAULT 'full'")

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA busy_timeout=30000")
            db.row_factory = sqlite3.Row
            yield db
        finally:
            db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    @staticmethod
    def _info(row: sqlite3.Row) -> JobInfo:
        return JobInfo(
            id=row["id"],
            project=row["project"],
            state=row["state"],
            trigger=row["trigger"],
            enqueued_at=row["enqueued_at"],
            started_at=row["started_at"],
            ended_at=row["ended_at"],
            progress=json.loads(row["progress"] or "{}"),
            result=json.loads(row["result"]) if row["result"] else None,
            error=row["error"],
            attempts=row["attempts"],
            lane=row["lane"],
        )

    def enqueue(self, project_key: str, trigger: str, lane: str = FULL) -> tuple[JobInfo, bool]:
        with self._transaction() as db:
            row = db.execute(
                "SELECT * FROM jobs WHERE project = ? AND state = ? AND lane = ?", (project_key, QUEUED, lane)
            ).fetchone()
            if row is not None:
                merged = merge_triggers(row["trigger"], trigger)
                if merged != row["trigger"]:
                    db.execute("UPDATE jobs SET trigger = ? WHERE id = ?", (merged, row["id"]))
                    row = db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone()
                    log.info("project %s: %s joined queued job %s, now %s", project_key, trigger, row["id"], merged)
                return self._info(row), False
            job_id = _job_id(project_key)
            db.execute(
                "INSERT INTO jobs (id, project, state, trigger, enqueued_at, lane) VALUES (?, ?, ?, ?, ?, ?)",
                (job_id, project_key, QUEUED, trigger, time.time(), lane),
            )
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        log.info("project %s: queued %s-lane job %s (%s)", project_key, lane, job_id, trigger)
        return self._info(row), True

    def running(self, project_key: str, lane: str) -> bool:
        with self._connect() as db:
            return db.execute(
                "SELECT 1 FROM jobs WHERE project = ? AND state = ? AND lane = ? LIMIT 1", (project_key, RUNNING, lane)
            ).fetchone() is not None

    def get(self, job_id: str) -> JobInfo | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._info(row) if row else None

    def jobs(self, project_key: str | None = None, limit: int = 50) -> list[JobInfo]:
        with self._connect() as db:
            if project_key:
                rows = db.execute(
                    "SELECT * FROM jobs WHERE project = ? ORDER BY enqueued_at DESC LIMIT ?", (project_key, limit)
                ).fetchall()
            else:
                rows = db.execute("SELECT * FROM jobs ORDER BY enqueued_at DESC LIMIT ?", (limit,)).fetchall()
        return [self._info(row) for row in rows]

    # runner side
    def claim(self, lane: str = FULL) -> JobInfo | None:
        with self._transaction() as db:
            row = db.execute(
                "SELECT * FROM jobs WHERE state = ? AND lane = ? AND project NOT IN "
                "(SELECT project FROM jobs WHERE state = ? AND lane = ?) ORDER BY enqueued_at LIMIT 1",
                (QUEUED, lane, RUNNING, lane),
            ).fetchone()
            if row is None:
                return None
            db.execute(  # (a retry starts with no progress: the failed attempt's is not this one's)
                "UPDATE jobs SET state = ?, started_at = ?, attempts = attempts + 1, progress = '{}' WHERE id = ?",
                (RUNNING, time.time(), row["id"]),
            )
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone()
        return self._info(row)

    def set_progress(self, job_id: str, progress: dict) -> None:
        with self._connect() as db:
            db.execute("UPDATE jobs SET progress = ? WHERE id = ?", (json.dumps(progress), job_id))

    def finish(self, job_id: str, result: dict) -> None:
        with self._connect() as db:
            db.execute(
                "UPDATE jobs SET state = ?, ended_at = ?, result = ? WHERE id = ?",
                (FINISHED, time.time(), json.dumps(result), job_id),
            )

    def fail(self, job_id: str, error: str, retry: bool, refund: bool = False) -> bool:
        """Mark a job failed, or queue it again (it keeps its id and attempt count); ``refund``: the
        attempt is not counted (the runner was asked to stop: a deploy is no failure of the job).
        True where it failed for good (no retry of its own, nor a queued job that retries it)."""
        with self._transaction() as db:
            if refund:
                db.execute("UPDATE jobs SET attempts = MAX(0, attempts - 1) WHERE id = ?", (job_id,))
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return False
            queued = db.execute(
                "SELECT id, trigger FROM jobs WHERE project = ? AND state = ? AND lane = ? AND id != ?",
                (row["project"], QUEUED, row["lane"], job_id),
            ).fetchone()
            if retry and row["attempts"] <= self.settings.job_retries and queued is None:
                # a job that failed goes behind the jobs queued since (one that crashes again does not
                # hold them up); one stopped by a deploy keeps its place
                db.execute(
                    "UPDATE jobs SET state = ?, started_at = NULL, progress = '{}', error = ?, enqueued_at = ? WHERE id = ?",
                    (QUEUED, f"attempt {row['attempts']} failed: {error}",
                     row["enqueued_at"] if refund else time.time(), job_id),
                )
            elif retry and row["attempts"] <= self.settings.job_retries:
                # the job queued for this project and lane is the retry: it must also do what this
                # one was asked (Start Training's sync, a refresh at the end)
                merged = merge_triggers(queued["trigger"], row["trigger"])
                db.execute("UPDATE jobs SET trigger = ? WHERE id = ?", (merged, queued["id"]))
                db.execute(
                    "UPDATE jobs SET state = ?, ended_at = ?, error = ? WHERE id = ?",
                    (FAILED, time.time(), f"{error} (retried as {queued['id']})", job_id),
                )
            else:
                db.execute(
                    "UPDATE jobs SET state = ?, ended_at = ?, error = ? WHERE id = ?",
                    (FAILED, time.time(), error, job_id),
                )
                return True
        return False

    def orphans(self) -> list[JobInfo]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM jobs WHERE state = ?", (RUNNING,)).fetchall()
        return [self._info(row) for row in rows]


def warm_imports(settings: Settings) -> float:
    """Import what a job needs, without running a tensor op: the training code, torch,
    transformers, and the model class of the base encoder (its modeling module is
    most of the cost).  A job started afterwards in this process, or in a process forked from it
    (an rq work horse), skips that.  Best effort: a failure costs the job only the time.  Returns
    the seconds it took.  No tokenizer is built and no tensor made, so forking afterwards is safe."""
    started = time.perf_counter()
    try:
        for module in ("finetune", "ner_job", "refresh", "store"):  # the job's own imports
            importlib.import_module(f"{__package__}.{module}")
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(settings.encoder_path)
        AutoModel._model_mapping[type(config)]  # imports the modeling module (what from_pretrained does)
    except Exception:
        log.debug("warming the job imports failed", exc_info=True)
    return time.perf_counter() - started


def on_orphaned(parent: int, then, every: float = 1.0) -> None:
    """Call ``then()`` (in a watching thread) once this process finds itself orphaned: its parent
    ``parent`` gone, killed hard (SIGKILL, the OOM killer), so it could not stop its children."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        then()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def exit_with_parent(parent: int, every: float = 1.0) -> None:
    """End this process as soon as it finds itself orphaned.  A job process left running would
    train beside the retry the restarted runner starts, and promote a version the job table never
    shows."""
    on_orphaned(parent, lambda: os._exit(3), every)


def _job_process(settings: Settings, conn, ahead: bool, parent: int | None = None) -> None:
    """One job's process: warm the imports, then take one job from ``conn`` and send back its
    outcome.  ``ahead``: started before its job, as a lane's standby (see ``STANDBY_LANES``);
    ``parent``: the runner's pid, whose death ends this process too."""
    if parent is not None:
        exit_with_parent(parent)
    from .logs import configure

    configure(settings.log_level)
    warmed = warm_imports(settings)
    ready = time.time()
    try:
        job = conn.recv()
    except (EOFError, OSError):  # the runner went away before handing over a job
        return
    if job is None:  # the runner stops: not needed
        return
    # the runner stopping ends this process with SIGTERM: as an exit, so that what the job holds is
    # let go on the way out (the sync lease of Start Training, else held 15 minutes by no one)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    queue = EmbeddedTrainingQueue(settings)
    try:
        result = execute_training(
            settings, job.project, job.trigger, Throttled(lambda u: queue.set_progress(job.id, u)), job.lane
        )
        result["process"] = {
            "pid": os.getpid(),
            "started_ahead": ahead,
            "warm_imports_s": round(warmed, 2),
            "waited_for_job_s": round(max(0.0, time.time() - ready), 2) if ahead else 0.0,
        }
        conn.send(("ok", result))
    except (KeyboardInterrupt, SystemExit) as exc:  # Ctrl-C reached the whole group: retried, like a stop
        with contextlib.suppress(OSError, ValueError):
            conn.send(("interrupted", f"the job process was interrupted ({type(exc).__name__})"))
    except BaseException as exc:  # report everything, the runner decides
        log.exception("job %s failed", job.id)
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


class JobRunner:
    """Runs the embedded queue's jobs one at a time; one runner per MODEL_DIR (flock)."""

    def __init__(self, settings: Settings, poll: float = 0.5):
        self.settings = settings
        self.queue = EmbeddedTrainingQueue(settings)
        self.poll = poll
        self.stopping = threading.Event()
        self.context = multiprocessing.get_context("spawn")
        self._standby: dict[str, tuple[Any, Any]] = {}  # lane -> (process, connection), started ahead

    def _start_process(self, ahead: bool) -> tuple[Any, Any]:
        ours, theirs = self.context.Pipe()
        process = self.context.Process(
            target=_job_process, args=(self.settings, theirs, ahead, os.getpid()), daemon=True
        )
        process.start()
        theirs.close()
        return process, ours

    def _process_for(self, lane: str, job: JobInfo) -> tuple[Any, Any]:
        """The lane's standby process, handed ``job``; else a new process (when the lane keeps
        none, or its standby died)."""
        standby = self._standby.pop(lane, None)
        if standby is not None:
            process, conn = standby
            if process.is_alive():
                try:
                    conn.send(job)
                    return process, conn
                except (OSError, ValueError):
                    pass
            log.warning("the %s lane's standby job process was gone (exit code %s); starting one", lane, process.exitcode)
            self._close(standby)
        process, conn = self._start_process(ahead=False)
        conn.send(job)
        return process, conn

    def _stand_by(self, lane: str) -> None:
        """Start the lane's next job process if it keeps one and has none (or the one it had died)."""
        if not self.settings.job_standby or lane not in STANDBY_LANES or self.stopping.is_set():
            return
        standby = self._standby.get(lane)
        if standby is not None and not standby[0].is_alive():
            log.warning("the %s lane's standby job process died (exit code %s); starting another",
                        lane, standby[0].exitcode)
            self._close(self._standby.pop(lane))
            standby = None
        if standby is None:
            self._standby[lane] = self._start_process(ahead=True)

    @staticmethod
    def _close(standby: tuple[Any, Any], wait: float = 0.0) -> None:
        process, conn = standby
        with contextlib.suppress(OSError, ValueError):
            conn.send(None)
        conn.close()
        process.join(wait)
        if process.is_alive():
            process.terminate()
            process.join(5)

    @property
    def _schedule_mark(self):
        return self.settings.model_dir / ".schedule-last"

    def _last_scheduled(self) -> float | None:
        """When the schedule last queued its jobs (``MODEL_DIR/.schedule-last``), if ever."""
        try:
            return float(self._schedule_mark.read_text().strip())
        except (OSError, ValueError):
            return None

    def _schedule_loop(self) -> None:
        """TRAIN_SCHEDULE's runs, in a thread of their own (a long job never delays them), counted
        from the schedule's last run (``MODEL_DIR/.schedule-last``), read once this runner holds
        the flock: restarts, however frequent, never push the schedule back, a runner that took
        over from another never runs a slot twice, and a run missed while no runner ran comes at
        once.  A ``MODEL_DIR`` that has no mark yet gets one at its first start."""
        schedule = self.settings.train_schedule
        last = self._last_scheduled()
        if last is None:
            last = time.time()
            self._write_schedule_mark(last)
        while not self.stopping.is_set():
            try:
                mark, wait = schedule_due(schedule, last, time.time())
            except Exception:  # (settings refuse an expression that never comes due: never reached)
                log.exception("schedule: TRAIN_SCHEDULE=%s gives no next run", schedule)
                mark, wait = None, 60.0
            if mark is None:
                self.stopping.wait(wait)
                continue
            last = mark
            self._write_schedule_mark(last)
            try:
                queued = scheduled_training()
                log.info("schedule: queued %d project(s)", len(queued))
            except Exception:
                log.exception("scheduled trigger failed")

    def _write_schedule_mark(self, moment: float) -> None:
        try:
            write_atomic(self._schedule_mark, f"{moment:.3f}\n".encode())
        except OSError:
            log.warning("schedule: could not write %s; a restart counts the interval from then", self._schedule_mark)

    @contextlib.contextmanager
    def _exclusive(self, wait: bool = True) -> Iterator[bool]:
        """Hold the runner's flock for the block (``True``); waits for it while another runner
        holds it, unless ``wait`` is false (then ``False`` at once)."""
        path = self.settings.model_dir / ".job-runner.lock"
        with open(path, "a+") as handle:
            held = False
            while not self.stopping.is_set():
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    held = True
                    break
                except BlockingIOError:
                    if not wait:
                        break
                    self.stopping.wait(1.0)  # another runner serves this MODEL_DIR; stand by
            try:
                yield held
            finally:
                if held:
                    with contextlib.suppress(OSError):
                        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def stop(self, *_: Any) -> None:
        self.stopping.set()

    def run_forever(self, burst: bool = False) -> bool:
        """Run jobs until stopped (``burst``: until the queue is empty).  False: ``burst``, and
        another runner serves this ``MODEL_DIR`` (a burst never waits for it)."""
        with self._exclusive(wait=not burst) as held:
            if self.stopping.is_set():
                return True
            if not held:
                return False
            for job in self.queue.orphans():
                log.warning("job %s was running when the job runner stopped; retrying or failing it", job.id)
                self.queue.fail(job.id, "the job runner stopped while this job ran", retry=True)
            log.info("job runner ready (models in %s)", self.settings.model_dir)
            lanes = [threading.Thread(target=self._lane, args=(lane, burst), name=f"lane-{lane}") for lane in LANES]
            schedule = None
            if self.settings.train_schedule and not burst:
                schedule = threading.Thread(target=self._schedule_loop, name="schedule", daemon=True)
                schedule.start()
            for thread in lanes:
                thread.start()
            for thread in lanes:
                while thread.is_alive():
                    thread.join(0.5)
            if schedule is not None:
                schedule.join(10)  # a run in progress finishes queuing its jobs
        return True

    def _lane(self, lane: str, burst: bool) -> None:
        """One lane's loop: its jobs one at a time, each in a child process of its own (for the
        lanes in ``STANDBY_LANES``, started ahead while the lane waits)."""
        failures = 0
        try:
            while not self.stopping.is_set():
                job = None
                try:
                    job = self.queue.claim(lane)
                    if job is None:
                        if burst:
                            return
                        self._stand_by(lane)
                        self.stopping.wait(self.poll)
                        continue
                    self.run_one(job)
                    failures = 0
                except Exception as exc:  # a database blip, a failed spawn: the lane goes on
                    failures += 1
                    pause = min(30.0, 2.0 ** failures)
                    log.exception("the %s lane's loop failed (%d in a row); going on in %.0f s", lane, failures, pause)
                    if job is not None:
                        self._fail_if_running(job.id, f"the job runner failed around this job: {type(exc).__name__}: {exc}")
                    self.stopping.wait(pause)
        finally:
            standby = self._standby.pop(lane, None)
            if standby is not None:
                self._close(standby, wait=2.0)

    def _fail_if_running(self, job_id: str, reason: str) -> None:
        """After a failure of the runner itself: a claimed job that did not end is retried."""
        try:
            job = self.queue.get(job_id)
            if job is not None and job.state == RUNNING:
                self.queue.fail(job_id, reason, retry=True)
        except Exception:
            log.exception("job %s: could not be marked for a retry; the next start of the runner retries it", job_id)

    def run_one(self, job: JobInfo) -> None:
        log.info(
            "job %s: training project %s (%s, %s lane, attempt %d)", job.id, job.project, job.trigger, job.lane, job.attempts
        )
        started_seq = self.queue.seq_now(job.project)
        child, receiver = self._process_for(job.lane, job)
        deadline = time.monotonic() + self.settings.job_timeout
        outcome = None
        try:
            while outcome is None:
                if receiver.poll(0.5):
                    try:
                        outcome = receiver.recv()
                    except EOFError:
                        outcome = ("crash", f"the job process died (exit code {child.exitcode})")
                elif not child.is_alive():
                    child.join()
                    outcome = ("crash", f"the job process died (exit code {child.exitcode})")
                elif time.monotonic() > deadline:
                    child.kill()
                    outcome = ("timeout", f"timed out after {self.settings.job_timeout}s (JOB_TIMEOUT)")
                elif self.stopping.is_set():
                    child.terminate()
                    child.join(10)
                    outcome = ("stopped", "the job runner was stopped")
        except BaseException:  # the lane retries the job: never beside this process still training
            with contextlib.suppress(Exception):
                child.kill()
                child.join(10)
            raise
        child.join(10)
        receiver.close()
        kind, body = outcome
        if kind == "interrupted":
            # Ctrl-C in a terminal reaches the runner and its job process together: the runner is
            # stopping, and the job goes back in its place without using a retry (else a crash)
            kind = "stopped" if self.stopping.wait(2.0) else "crash"
        if kind == "ok":
            self.queue.finish(job.id, body)
            self.queue.requeue_if_behind(job.project, job.lane, body)
        else:
            log.error("job %s: %s", job.id, body)
            if self.queue.fail(job.id, body, retry=kind in ("crash", "timeout", "stopped"), refund=kind == "stopped"):
                self.queue.requeue_after_failure(job.project, job.lane, started_seq)


#: set by ``ls-backend serve`` for the runner it starts: the pid of the server, and a pipe the
#: runner writes "stopped" to when it ends on request (a runner that dies writes nothing: restarted)
RUNNER_PARENT_ENV = "LS_BACKEND_RUNNER_PARENT"
RUNNER_STOP_FD_ENV = "LS_BACKEND_RUNNER_STOP_FD"


def run_embedded_runner(settings: Settings, burst: bool = False) -> int:
    runner = JobRunner(settings)
    signal.signal(signal.SIGTERM, runner.stop)
    signal.signal(signal.SIGINT, runner.stop)
    parent = os.environ.get(RUNNER_PARENT_ENV, "")
    if parent.isdecimal():
        # the server killed outright cannot stop its runner: it stops itself, as if asked (its job
        # goes back to the queue), and never runs jobs with a dead server's settings beside the
        # runner of the next one
        def stop() -> None:
            log.warning("the server (pid %s) is gone: the job runner stops", parent)
            runner.stop()

        on_orphaned(int(parent), stop)
    note = os.environ.pop(RUNNER_STOP_FD_ENV, "")  # (popped: the job processes it starts do not inherit it)
    if not runner.run_forever(burst=burst):
        print(f"ls-backend worker --burst: another job runner serves {settings.model_dir} (it holds "
              f"{settings.model_dir / '.job-runner.lock'}) and runs its queue; nothing was run here", file=sys.stderr)
        return 1
    if note.isdecimal():  # ended on request: serve does not restart it
        with contextlib.suppress(OSError):
            os.write(int(note), b"stopped")
            os.close(int(note))
    return 0
