"""Webhook latency and throughput of the served backend, beside a no-op Flask handler; backfill time.

Usage::

    .venv/bin/python bench/webhooks.py [--events 3000] [--senders 50] [--repeats 2] [--backfill 10000]

Three parts, all through real processes:

1. Latency and throughput under ``--senders`` concurrent senders (threads, one keep-alive
   connection each), each posting ``ANNOTATION_CREATED`` events shaped as Label Studio
   sends them.  Ours is ``ls-backend serve`` (through ``tests/support/backend.py``) with
   two web workers; the baseline is a Flask app whose ``/webhook`` parses the JSON and
   answers, served the same way (gunicorn, gthread, two workers x four threads).  Ours runs
   with ``TRAIN_EVERY=0`` so that no training job competes for the cores meanwhile.  The
   runs are interleaved, ``--repeats`` each; the best run of each is reported.  Every
   event of ours is checked to be in the store afterwards.
2. The same against ``ls-backend serve`` with ``DATABASE_URL`` on the PostgreSQL at
   ``BENCH_DATABASE_URL`` (default ``postgresql://postgres@127.0.0.1:5432/test``, in a
   schema of its own, dropped afterwards); plus the store alone, in this process
   (8 threads calling ``record_event``), on SQLite and on PostgreSQL.
3. Backfill: a real Label Studio 1.23 (``tests/support/label_studio.py``), ONE bulk import
   of ``--backfill`` pre-annotated tasks, then ``sync_project`` into an empty store,
   timed, on SQLite and on PostgreSQL.  Texts are AG News rows from ../shared/data when
   present, else generated sentences.

The client, the server and the database share this machine's cores; the ratio of
latencies is the figure to read, absolute numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ls_backend.labeling import plan_for  # noqa: E402
from ls_backend.settings import Settings  # noqa: E402
from ls_backend.store import CorrectionStore  # noqa: E402
from tests.support.backend import BackendServer, free_port  # noqa: E402
from tests.support.events import TOPIC_CONFIG, annotation_event, choices, key_of, project  # noqa: E402
from tests.support.stores import postgres_schema  # noqa: E402

DATA = REPO.parent / "shared" / "data"
LABELS = ("World", "Sports", "Business", "Sci/Tech")
TOPIC = plan_for(TOPIC_CONFIG).control("topic")
# two web workers as the tests run it; no label-count training jobs, which would share the cores
# with the webhooks being measured (START_TRAINING is not sent here)
SERVER_ENV = {"WEB_WORKERS": "2", "TRAIN_EVERY": "0"}

NOOP_APP = '''
from flask import Flask, jsonify, request

app = Flask("noop")


@app.post("/webhook")
def webhook():
    payload = request.get_json(force=True)
    return jsonify({"status": "ok", "action": payload.get("action")})


@app.get("/health")
def health():
    return jsonify({"status": "UP"})
'''


class NoopServer:
    """The baseline: a Flask handler that does nothing, under gunicorn configured as ``ls-backend serve`` is."""

    def __init__(self, folder: Path, workers: int = 2):
        self.folder = folder
        self.workers = workers
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "NoopServer":
        (self.folder / "noop_app.py").write_text(NOOP_APP)
        gunicorn = Path(sys.executable).parent / "gunicorn"
        self.process = subprocess.Popen(
            [str(gunicorn), "--bind", f"127.0.0.1:{self.port}", "--workers", str(self.workers),
             "--worker-class", "gthread", "--threads", "4", "--log-level", "warning", "noop_app:app"],
            cwd=self.folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if requests.get(self.url + "/health", timeout=1).ok:
                    return self
            except requests.RequestException:
                time.sleep(0.2)
        raise RuntimeError("the no-op server did not start")

    def __exit__(self, *exc) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            self.process.wait(timeout=20)


def burst(url: str, events: list[dict], senders: int) -> dict:
    """Post every event once, ``senders`` at a time; latency percentiles and events per second."""
    latencies: list[float] = []
    failures = 0
    lock = threading.Lock()
    chunks = [events[i::senders] for i in range(senders)]
    start = threading.Barrier(senders + 1)

    def send(chunk: list[dict]) -> None:
        nonlocal failures
        session = requests.Session()
        mine, bad = [], 0
        start.wait()
        for event in chunk:
            began = time.perf_counter()
            response = session.post(url + "/webhook", json=event, timeout=30)
            mine.append(time.perf_counter() - began)
            bad += response.status_code != 200
        with lock:
            latencies.extend(mine)
            failures += bad

    threads = [threading.Thread(target=send, args=(chunk,)) for chunk in chunks]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    latencies.sort()
    return {
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "events_per_s": len(events) / elapsed,
        "failures": failures,
    }


def make_events(project_id: int, count: int, first_id: int) -> list[dict]:
    proj = project(project_id)
    return [
        annotation_event(first_id + i, first_id + i, choices(LABELS[i % 4]), proj=proj, text=f"news item {i}")
        for i in range(count)
    ]


def check_stored(store_url: str, project_id: int, expected: int) -> None:
    store = CorrectionStore(store_url)
    try:
        held = store.stored_annotations(key_of(project_id))
    finally:
        store.close()
    if held != expected:
        raise SystemExit(f"store holds {held} annotations of project {project_id}, expected {expected}")


def line(name: str, result: dict) -> str:
    return (f"  {name:<34} p50 {result['p50_ms']:7.2f} ms   p99 {result['p99_ms']:7.2f} ms   "
            f"{result['events_per_s']:7.0f} events/s   failures {result['failures']}")


def webhook_figures(args: argparse.Namespace, root: Path) -> None:
    print(f"\n== webhooks: {args.events} events, {args.senders} concurrent senders, best of {args.repeats}")
    best: dict[str, dict] = {}
    project_id = 9000
    with NoopServer(root) as noop, BackendServer(root / "sqlite-models", env=SERVER_ENV) as ours:
        sqlite_url = f"sqlite:///{ours.model_dir / 'store.sqlite'}"
        burst(noop.url, make_events(1, 200, 1), args.senders)  # warm both up
        burst(ours.url, make_events(8999, 200, 1), args.senders)
        for _ in range(args.repeats):
            noop_run = burst(noop.url, make_events(1, args.events, 1), args.senders)
            project_id += 1
            ours_run = burst(ours.url, make_events(project_id, args.events, 1), args.senders)
            check_stored(sqlite_url, project_id, args.events)
            for name, run in (("no-op Flask handler", noop_run), ("ls-backend, SQLite", ours_run)):
                if name not in best or run["p50_ms"] < best[name]["p50_ms"]:
                    best[name] = run
    try:
        with postgres_schema() as pg_url:
            with BackendServer(root / "pg-models", env={**SERVER_ENV, "DATABASE_URL": pg_url}) as ours_pg:
                burst(ours_pg.url, make_events(8999, 200, 1), args.senders)
                for _ in range(args.repeats):
                    project_id += 1
                    run = burst(ours_pg.url, make_events(project_id, args.events, 1), args.senders)
                    check_stored(pg_url, project_id, args.events)
                    if "ls-backend, PostgreSQL" not in best or run["p50_ms"] < best["ls-backend, PostgreSQL"]["p50_ms"]:
                        best["ls-backend, PostgreSQL"] = run
            store_alone = store_rate(pg_url, args.events)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # tests.support.services.unavailable raises pytest's skip
        print(f"  (PostgreSQL skipped: {exc})")
        store_alone = None
    for name, run in best.items():
        print(line(name, run))
    noop_run = best["no-op Flask handler"]
    for name in ("ls-backend, SQLite", "ls-backend, PostgreSQL"):
        if name in best:
            print(f"  {name}: p50 x{best[name]['p50_ms'] / noop_run['p50_ms']:.2f}, "
                  f"p99 x{best[name]['p99_ms'] / noop_run['p99_ms']:.2f} the no-op handler's")
    print("\n== the store alone, in this process (8 threads calling record_event)")
    alone_url = "sqlite:///" + str(root / "alone.sqlite")
    print(f"  SQLite       {store_rate(alone_url, args.events):7.0f} events/s")
    if store_alone is not None:
        print(f"  PostgreSQL   {store_alone:7.0f} events/s")


def store_rate(url: str, count: int, threads: int = 8) -> float:
    store = CorrectionStore(url)
    events = make_events(9500, count, 1)
    chunks = [events[i::threads] for i in range(threads)]
    workers = [threading.Thread(target=lambda c=c: [store.record_event(e) for e in c]) for c in chunks]
    began = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - began
    held = store.stored_annotations(key_of(9500))
    store.close()
    if held != count:
        raise SystemExit(f"store alone: {held} of {count} stored")
    return count / elapsed


def texts(count: int) -> list[tuple[str, str]]:
    path = DATA / "agnews" / "dev.tsv"  # 10,000 rows; generated sentences make up the rest
    rows: list[tuple[str, str]] = []
    if path.exists():
        with open(path, newline="", encoding="utf-8") as handle:
            for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
                rows.append((row[0], row[1]))
                if len(rows) == count:
                    return rows
    while len(rows) < count:
        i = len(rows)
        rows.append((f"generated news item {i} about {LABELS[i % 4].lower()}", LABELS[i % 4]))
    return rows


def backfill_figures(args: argparse.Namespace, root: Path) -> None:
    from tests.support import label_studio as ls

    print(f"\n== backfill: {args.backfill} annotations from a real Label Studio {ls.LABEL_STUDIO_VERSION}")
    if not ls.is_installed():
        print(f"  skipped: Label Studio is not prepared (run {ls.ENSURE_SCRIPT})")
        return
    from ls_backend.sync import sync_project

    with ls.LabelStudio() as studio:
        proj = studio.create_project("backfill bench", TOPIC_CONFIG)
        rows = texts(args.backfill)
        generated = sum(text.startswith("generated news item ") for text, _ in rows)
        print(f"  texts: {len(rows) - generated} AG News dev rows, {generated} generated sentences")
        tasks = [{"data": {"text": text}, "annotations": [{"result": choices(label)}]} for text, label in rows]
        began = time.perf_counter()
        answer = studio.request("POST", f"/api/projects/{proj['id']}/import", json=tasks, timeout=1800)
        print(f"  one bulk import: {answer.get('task_count')} tasks, {answer.get('annotation_count')} annotations "
              f"in {time.perf_counter() - began:.1f}s")
        settings = Settings(model_dir=root / "backfill", label_studio_url=studio.url,
                            label_studio_api_key=studio.token)
        targets = [("SQLite", f"sqlite:///{root / 'backfill.sqlite'}")]
        pg = None
        try:
            pg = postgres_schema()
            targets.append(("PostgreSQL", pg.__enter__()))
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            print(f"  (PostgreSQL skipped: {exc})")
            pg = None
        try:
            for name, url in targets:
                store = CorrectionStore(url)
                report = sync_project(store, settings, str(proj["id"]), reason="bench")
                examples = len(store.training_examples(report.project_key, TOPIC))
                store.close()
                print(f"  {name:<11} {report.seconds:6.1f}s  {report.inserted / report.seconds:6.0f} annotations/s  "
                      f"({report.tasks} tasks, {report.inserted} inserted, store {report.stored_annotations} = "
                      f"Label Studio {report.label_studio_annotations}; {examples} training examples)")
        finally:
            if pg is not None:
                pg.__exit__(None, None, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--senders", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--backfill", type=int, default=10_000)
    parser.add_argument("--skip", choices=("webhooks", "backfill"), action="append", default=[])
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="bench-webhooks-") as folder:
        root = Path(folder)
        if "webhooks" not in args.skip:
            webhook_figures(args, root)
        if "backfill" not in args.skip:
            backfill_figures(args, root)


if __name__ == "__main__":
    main()
