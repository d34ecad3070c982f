"""``ls-backend`` command line: serve and the operator commands."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from .settings import Settings, SettingsError, has_weights


def web_workers(settings: Settings) -> int:
    if settings.web_workers:
        return settings.web_workers
    return max(1, min(4, os.cpu_count() or 1))


def torch_threads(settings: Settings, workers: int) -> int:
    if settings.torch_threads:
        return settings.torch_threads
    return max(1, (os.cpu_count() or 1) // workers)


def serve(settings: Settings, host: str, port: int) -> int:
    from gunicorn.app.base import BaseApplication

    workers = web_workers(settings)
    threads = torch_threads(settings, workers)
    settings.model_dir.mkdir(parents=True, exist_ok=True)

    class Application(BaseApplication):
        def load_config(self) -> None:
            config = {
                "bind": f"{host}:{port}",
                "workers": workers,
                "worker_class": "gthread",
                "threads": 4,
                "timeout": settings.web_timeout,
                "graceful_timeout": 10,
                # idle keep-alive connections stay open a while (gthread parks them, no thread held):
                # with gunicorn's 2 s default, a client polling every ~2 s on one session races the close
                "keepalive": 30,
                "loglevel": settings.log_level.lower(),
                "accesslog": "-" if settings.log_level == "DEBUG" else None,
                "post_worker_init": lambda worker: _limit_threads(threads),
            }
            # gunicorn 27 opens a control socket at one path per user (~/.gunicorn/gunicorn.ctl): a second
            # backend on the machine took it over, and stopping that one removed the first one's
            if "control_socket_disable" in self.cfg.settings:
                config["control_socket_disable"] = True
            for key, value in config.items():
                if value is not None:
                    self.cfg.set(key, value)

        def load(self):
            from .logs import configure

            configure(settings.log_level)
            from .api import create_app

            return create_app(settings)

    # (no CUDA call here: a CUDA context made in the master breaks the forked web workers;
    # each worker logs the device and precision it serves with)
    print(
        f"ls-backend serving on http://{host}:{port} ({workers} web workers x {threads} torch threads, "
        f"models in {settings.model_dir.resolve()})",
        flush=True,
    )
    runner = None if settings.redis_url else EmbeddedRunnerProcess()
    if runner is not None:
        runner.start()
    try:
        Application().run()
    finally:
        if runner is not None:
            runner.stop()
    return 0


class EmbeddedRunnerProcess:
    """The one job runner beside the web workers when there is no Redis (``ls-backend worker``
    in a child process), restarted if it dies; stopped with the server."""

    def __init__(self) -> None:
        import threading

        self.process = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._supervise, name="job-runner-supervisor", daemon=True)

    def _spawn(self):
        import subprocess

        from .jobs import RUNNER_PARENT_ENV, RUNNER_STOP_FD_ENV

        # the runner writes "stopped" here when it ends on request; a runner that died writes nothing
        note, write_end = os.pipe()
        os.set_blocking(note, False)
        try:
            process = subprocess.Popen([sys.executable, "-m", "ls_backend.cli", "worker"], pass_fds=(write_end,),
                                       env={**os.environ, RUNNER_PARENT_ENV: str(os.getpid()),
                                            RUNNER_STOP_FD_ENV: str(write_end)})
        finally:
            os.close(write_end)
        process.stop_note = note
        return process

    def _gone(self) -> bool:
        """Whether the runner has ended (whatever its exit code says: gunicorn's master reaps every
        child it finds exited, this one too, and ``Popen.poll`` then reads 0 even for a crash)."""
        return self.process is not None and self.process.poll() is not None

    @staticmethod
    def _ended_on_request(process) -> bool:
        """Whether the ended runner said it was asked to stop (a signal: the server's shutdown, an
        operator), rather than dying (SIGKILL, the OOM killer, a crash)."""
        note = getattr(process, "stop_note", None)
        if note is None:
            return False
        try:
            return b"stopped" in os.read(note, 64)
        except OSError:  # nothing written (a job process it started may still hold the pipe open)
            return False
        finally:
            os.close(note)
            process.stop_note = None

    def start(self) -> None:
        import atexit

        self.process = self._spawn()
        atexit.register(self.stop)
        self.thread.start()

    #: a runner up this long counts as healthy again: the next restart waits 1 s, not the backoff
    HEALTHY_AFTER = 60.0

    def _supervise(self) -> None:
        import time

        delay, started = 1.0, time.monotonic()
        while not self.stopping.wait(delay):
            if not self._gone():
                if delay > 1.0 and time.monotonic() - started >= self.HEALTHY_AFTER:
                    delay = 1.0  # (a runner that dies a few seconds after each start keeps backing off)
                continue
            if self._ended_on_request(self.process) or self.stopping.is_set():
                self.process = None  # asked to stop (Ctrl-C stops the server and it together): no restart
                continue
            print("ls-backend: the job runner died; restarting", file=sys.stderr, flush=True)
            self.process, started = self._spawn(), time.monotonic()
            delay = min(delay * 2, 30.0)

    def stop(self) -> None:
        import subprocess

        self.stopping.set()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()


def _probe(code: str, *args: str, timeout: float = 300):
    """Run ``code`` in a child Python (the server's own process stays free of torch and the model
    code): the finished process with ``last_error``, its last line on stderr; None past ``timeout``."""
    import subprocess

    try:
        done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    done.last_error = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
    return done


def _device_problem(settings: Settings) -> str | None:
    """What stops every web worker or job at start where the settings need CUDA and none is visible
    (``DEVICE=cuda``, or ``INFERENCE_PRECISION=float16``, which only CUDA runs), else None.  Asked
    of torch in a child process: CUDA touched in the server's own process breaks the web workers
    it forks."""
    if settings.device != "cuda" and settings.inference_precision != "float16":
        return None
    probe = _probe("import torch; print('cuda', torch.cuda.is_available())")
    if probe is None:
        return "torch did not answer within 300 s whether it sees a CUDA device (DEVICE / INFERENCE_PRECISION need one)"
    if probe.returncode != 0:
        return f"torch cannot be imported to check for a CUDA device: {probe.last_error}"
    if "cuda True" in probe.stdout.splitlines():
        return None
    if settings.device == "cuda":
        return "DEVICE=cuda but torch sees no CUDA device here; use DEVICE=auto or cpu (or a CUDA build of torch)"
    return ("INFERENCE_PRECISION=float16 needs CUDA and torch sees none here (DEVICE=auto found a CPU); "
            "use bfloat16 or float32, or leave it unset")


_BASE_MODEL_PROBE = """
import sys
from transformers import AutoConfig, AutoTokenizer
path = sys.argv[1]
AutoConfig.from_pretrained(path)
tokenizer = AutoTokenizer.from_pretrained(path)
if not getattr(tokenizer, "is_fast", False):
    raise SystemExit("its tokenizer is not a fast one (character offsets need one)")
# without its vocabulary files, transformers builds a tokenizer of its few special tokens that reads
# every word as unknown: every text would get the same embedding
if len(tokenizer) < 100:
    raise SystemExit(f"its tokenizer knows {len(tokenizer)} tokens, so it reads every word as unknown "
                     "(its vocabulary files are missing)")
"""


def _base_model_problem(settings: Settings) -> str | None:
    """What stops every web worker at start where ``BASE_MODEL`` names a folder whose config or
    tokenizer will not load (a ``config.json`` alone, a half-copied folder), else None.  Asked in a
    child process, as for the device: the server's own process stays free of the model code."""
    if not settings.base_model:
        return None
    probe = _probe(_BASE_MODEL_PROBE, settings.base_model)
    if probe is None:
        return f"BASE_MODEL={settings.base_model}: its config and tokenizer did not load within 300 s"
    if probe.returncode == 0:
        if has_weights(Path(settings.base_model)):
            return None
        reason = "it has no weights file (*.safetensors or pytorch_model.bin)"
    else:
        reason = probe.last_error
    return (f"BASE_MODEL={settings.base_model}: not a model folder this backend can load ({reason}); "
            "give a local Hugging Face model folder with its config, tokenizer and weights, or unset it for the bundled encoder")


def _limit_threads(count: int) -> None:
    import torch

    torch.set_num_threads(count)


def _bounded_int(low: int, high: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is not in {low}..{high}")
        return value

    return parse


def _amount(unit: str, high: float = math.inf):
    """An argument type: a number of ``unit`` in [0, ``high``] (NaN never: a deadline of NaN is never
    reached)."""
    limits = "0 or more; inf waits for good" if high == math.inf else f"0 to {high:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of {unit}") from None
        if not 0 <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is not a number of {unit} ({limits})")
        return value

    return parse


def _unreachable(exc: BaseException) -> str | None:
    """What an operator should read for a store, queue or folder that cannot be reached, else None."""
    from .store import StoreError

    kind = type(exc).__module__.split(".")[0]
    if isinstance(exc, StoreError) or kind == "sqlalchemy":
        return f"the corrections store cannot be opened: {str(exc).splitlines()[0]}"
    if kind == "redis":
        return f"Redis (REDIS_URL) cannot be reached: {str(exc).splitlines()[0]}"
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")
    if kind == "sqlite3":  # the embedding cache or the embedded job queue (the store goes through SQLAlchemy)
        return (f"a SQLite file cannot be read ({exc}): the embedding cache (embeddings.sqlite under CACHE_DIR, "
                "only a cache: delete it and the next job embeds anew) or the embedded job queue "
                "(jobs.sqlite under MODEL_DIR)")
    return None


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except Exception as exc:
        reason = _unreachable(exc)
        if reason is None:
            raise
        print(f"ls-backend: {reason}", file=sys.stderr)
        return 1


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ls-backend", description="Label Studio ML backend with transfer learning")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="start the web backend (gunicorn)")
    p_serve.add_argument("--host", default="0.0.0.0")
    p_serve.add_argument("--port", type=_bounded_int(0, 65535), default=9090)
    sub.add_parser("settings", help="print the settings in force (secrets masked)")
    p_cache = sub.add_parser("cache", help="print this machine's embedding cache per encoder (JSON); --prune to shrink it")
    p_cache.add_argument("--prune", action="store_true",
                         help="remove the embeddings of encoders unused for CACHE_MAX_AGE_DAYS, then the oldest rows "
                              "past CACHE_MAX_ROWS, and give the space back")
    p_cache.add_argument("--older-than", type=_amount("days", 36_500), metavar="DAYS", help="with --prune: this many days instead")
    p_status = sub.add_parser("status", help="print what the corrections store holds per project (JSON)")
    p_status.add_argument("--project", help="one project: its key, or a bare Label Studio id")
    p_sync = sub.add_parser("sync", help="fetch a project's annotations from Label Studio and reconcile the store")
    p_sync.add_argument("--project", required=True, help="the project key, or a bare Label Studio id")
    p_worker = sub.add_parser("worker", help="run training jobs: an rq worker with REDIS_URL, else the embedded job runner")
    p_worker.add_argument("--burst", action="store_true", help="stop when the queue is empty")
    p_worker.add_argument("--lane", choices=["all", "fast", "full"], default="all",
                          help="with REDIS_URL: which lane's jobs to take (default both, fast first)")
    sub.add_parser("scheduler", help="with REDIS_URL: queue TRAIN_SCHEDULE's jobs (its last run kept in Redis)")
    p_train = sub.add_parser("train", help="queue a fine-tuning job for a project")
    p_train.add_argument("--project", required=True, help="the project key, or a bare Label Studio id")
    p_train.add_argument("--wait", action="store_true", help="wait for the job and print its outcome")
    p_train.add_argument("--lane", choices=["fast", "full"], default="full",
                         help="fast: refit the heads only; full: TRAIN_MODE's candidates (default)")
    p_train.add_argument("--timeout", type=_amount("seconds"), default=3600.0, help="seconds to wait with --wait (inf: for good)")
    p_jobs = sub.add_parser("jobs", help="list training jobs (JSON)")
    p_jobs.add_argument("--project", help="one project: its key, or a bare Label Studio id")
    p_versions = sub.add_parser("versions", help="list a project's model versions with their figures (JSON)")
    p_versions.add_argument("--project", required=True, help="the project key, or a bare Label Studio id")
    p_rollback = sub.add_parser("rollback", help="serve an earlier version of a project")
    p_rollback.add_argument("--project", required=True, help="the project key, or a bare Label Studio id")
    p_rollback.add_argument("--to", help="the version to serve (default: the one served before the current one)")
    p_rollback.add_argument("--pin", action="store_true", help="also pin it: no automatic promotion until unpinned")
    p_pin = sub.add_parser("pin", help="pin a project to a version (default: the current one)")
    p_pin.add_argument("--project", required=True, help="the project key, or a bare Label Studio id")
    which = p_pin.add_mutually_exclusive_group()
    which.add_argument("--version", help="the version to pin")
    which.add_argument("--off", action="store_true", help="unpin instead")
    p_curve = sub.add_parser("curve", help="print a project's learning curve (JSON), optionally write the PNG")
    p_curve.add_argument("--project", required=True, help="the project key, or a bare Label Studio id")
    p_curve.add_argument("--png", help="write the plot to this file")
    p_rank = sub.add_parser("rank", help="print the next batch of unlabeled task ids to label (JSON)")
    p_rank.add_argument("--project", required=True, help="the project key, or a bare Label Studio id")
    p_rank.add_argument("--n", type=_bounded_int(1, 1000), default=20, help="how many tasks, 1 to 1000 (default 20)")
    p_rank.add_argument("--strategy", choices=["uncertainty", "diverse", "random", "coverage", "typical"],
                        help="default: uncertainty under SCORE_MODE (coverage before any trained version)")
    p_rank.add_argument("--refresh", action="store_true", help="refresh the predictions in Label Studio first")
    p_rank.add_argument("--seed", type=_bounded_int(0, 2**63 - 1), help="for the random and k-means choices (default SEED)")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"ls-backend: bad setting: {exc}", file=sys.stderr)
        return 2
    if args.command in ("serve", "worker", "rank"):  # (rank predicts in its own process when it refreshes)
        asked = False
        if args.command == "worker":  # (not in serve: the jobs module imports torch, which its master need not)
            from .jobs import RUNNER_PARENT_ENV

            asked = RUNNER_PARENT_ENV in os.environ  # the runner serve starts: serve has just asked
        problem = None if asked else (_device_problem(settings) or _base_model_problem(settings))
        if problem:
            print(f"ls-backend: bad setting: {problem}", file=sys.stderr)
            return 2
    if args.command == "serve":
        return serve(settings, args.host, args.port)
    if args.command == "settings":
        print(json.dumps(settings.describe(), indent=2))
        return 0
    if args.command == "status":
        return status(settings, args.project)
    if args.command == "cache":
        if args.older_than is not None and not args.prune:
            parser.error("--older-than goes with --prune")
        return cache(settings, args.prune, args.older_than)
    if args.command == "rank":
        return rank(settings, args)
    if args.command == "sync":
        return sync(settings, args.project)
    if args.command in ("worker", "scheduler", "train", "jobs", "versions", "rollback", "pin", "curve"):
        from . import commands

        return commands.run(args, settings)
    return 2


def status(settings: Settings, project: str | None) -> int:
    """The same JSON as ``GET /projects`` (or ``GET /projects/<key>``)."""
    from .store import CorrectionStore, UnknownProject

    store = CorrectionStore.from_settings(settings)
    try:
        if project:
            body: dict = store.project_summary(store.resolve_project(project)).to_dict()
        else:
            body = {"store": store.describe(), "projects": [p.to_dict() for p in store.projects()]}
    except UnknownProject as exc:
        print(f"ls-backend: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(json.dumps(body, indent=2))
    return 0


def cache(settings: Settings, prune: bool, older_than: float | None) -> int:
    """This machine's embedding cache: its size and rows per encoder; with ``prune``, the rows of
    encoders unused for ``older_than`` (else ``CACHE_MAX_AGE_DAYS``) days removed first, then the
    oldest rows past ``CACHE_MAX_ROWS``."""
    from .embeddings import EmbeddingCache, cache_file

    if not cache_file(settings.local_cache_dir).exists():
        print(json.dumps({"path": str(cache_file(settings.local_cache_dir)), "bytes": 0, "encoders": []}, indent=2))
        return 0
    embeddings = EmbeddingCache(settings.local_cache_dir)
    body: dict = {"path": str(embeddings.path)}
    if prune:
        days = settings.cache_max_age_days if older_than is None else older_than
        if older_than is None and days <= 0 and settings.cache_max_rows <= 0:
            print("ls-backend: CACHE_MAX_AGE_DAYS=0 and CACHE_MAX_ROWS=0 keep every embedding; give --older-than DAYS",
                  file=sys.stderr)
            return 2
        before = embeddings.size_bytes()
        # --older-than 0: every encoder (to prune, an age of 0 is no age limit)
        age_s = days * 86_400 if days > 0 or older_than is None else 1e-6
        removed = embeddings.prune(age_s, vacuum=True, max_rows=settings.cache_max_rows)
        body.update({"removed": [r.to_dict() for r in removed], "bytes_before": before})
    body["bytes"] = embeddings.size_bytes()
    body["encoders"] = [u.to_dict() for u in embeddings.usage()]
    print(json.dumps(body, indent=2))
    return 0


def rank(settings: Settings, args: argparse.Namespace) -> int:
    """The next batch to label; lists and predicts the unlabeled tasks first (in this process) when
    the pool is missing or not the current version's."""
    from .commands import resolve_key
    from .logs import configure
    from .refresh import RefreshError, rank_project
    from .registry import ModelRegistry
    from .sampling import NoPool
    from .store import CorrectionStore, UnknownProject
    from .sync import SyncError

    configure(settings.log_level)
    store = CorrectionStore.from_settings(settings)
    try:
        project = resolve_key(store, ModelRegistry(settings.model_dir), args.project)
        body = rank_project(settings, store, project, max(1, args.n), args.strategy, args.refresh, args.seed)
    except (UnknownProject, SyncError, RefreshError, NoPool) as exc:
        print(f"ls-backend: rank failed: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(json.dumps(body, indent=2))
    return 0


def sync(settings: Settings, project: str) -> int:
    """Reconcile one project with Label Studio now; prints the report."""
    from .logs import configure
    from .store import CorrectionStore, UnknownProject
    from .jobs import queue_from_settings
    from .sync import SyncError, sync_project, synced_outcome

    configure(settings.log_level)
    store = CorrectionStore.from_settings(settings)
    try:
        report = sync_project(store, settings, project, reason="ls-backend sync")
        body = report.to_dict()
        if report.changed:  # labels brought in queue training as labels from webhooks do
            from .jobs import redis_unreachable

            try:
                queue = queue_from_settings(settings)
                try:
                    job = queue.maybe_enqueue(store, synced_outcome(report))
                finally:
                    queue.close()
                body["queued_job"] = job.id if job is not None else None
            except redis_unreachable() as exc:  # the sync is done and stored: say so, and what did not follow
                body["queued_job"] = None
                body["queue_error"] = (f"the job queue (REDIS_URL) cannot be reached ({type(exc).__name__}); "
                                       "the labels are stored, and the next label or the schedule queues their training")
    except (SyncError, UnknownProject) as exc:
        print(f"ls-backend: sync failed: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(json.dumps(body, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
