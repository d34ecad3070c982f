"""Label efficiency through the running backend: simulated annotators, webhooks in, predictions out.

Usage::

    .venv/bin/python bench/learning_curve.py [--datasets agnews sst2] [--sizes 16 32 64 128 256] [--test 1000]

The backend is started the way the README starts it (``ls-backend serve``: embedded job runner,
SQLite, the bundled encoder, every setting at its default unless ``--env NAME=VALUE`` says
otherwise).  Per data set, one Label Studio project; its labels arrive by ``/webhook`` exactly as
Label Studio sends ``ANNOTATION_CREATED``, in batches that bring the labeled count to each of
``--sizes`` (drawn at random from the pool with ``--seed``, at least one of each class first).
The backend trains as it would for a user: a job every ``TRAIN_EVERY`` labels (coalesced), the full
lane once ``FULL_MIN_LABELS`` labels exist.  After each batch the script waits until no job of the
project is queued or running (and presses "Start Training" through ``POST /projects/<key>/train``
if the batch triggered none) and until ``/predict`` answers with the project's current version,
then asks ``/predict`` for the test rows and scores what was served.  "Served ... s after the last
label" is read by polling every 2 s, so it is a few seconds above the jobs' own time.

Pools and test rows: ``agnews/dev.tsv`` (tested on the first ``--test`` rows of ``test.tsv``) and
SST-2 training sentences of at least 6 words (tested on ``sst2/test.tsv``).

Printed beside the curve, measured in the same run:

* the cold-start zero-shot model (``v0``), served by the same backend;
* ``transformers.Trainer`` with default arguments (3 epochs, lr 5e-5, batch 8), retrained from the
  base encoder on the same labels at each size, as Label Studio's example backends do.

Also printed: per served version, its figure and its predecessor's on the evaluation slice when it
was promoted (the gate's own numbers: a served model is never worse than the one before it there
beyond the tolerance), and the seconds from the batch's last label to the version being served.
Skips (exit 0) with a message when ../shared/data is absent.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from label_efficiency import sample, trainer_baseline  # noqa: E402
from ls_backend.finetune import not_worse, slice_size, slice_tolerance  # noqa: E402
from ls_backend.settings import Settings, bundled_encoder_path  # noqa: E402
from tests.support.backend import BackendServer  # noqa: E402
from tests.support.data import AGNEWS_LABELS, DATA, agnews, sst2  # noqa: E402
from tests.support.events import SENTIMENT_CONFIG, TOPIC_CONFIG, annotation_event, choices, key_of, project  # noqa: E402

SST2_LABELS = ["Negative", "Positive"]
# from the issues: AG News >= 0.85 at 64 labels and >= 0.88 at 256
AIMS = {"agnews": {64: 0.85, 256: 0.88}, "sst2": {64: 0.75, 256: 0.80}}


def dataset(name: str, test_size: int):
    """(labels, control name, config, project id, pool rows, test rows)."""
    if name == "agnews":
        return AGNEWS_LABELS, "topic", TOPIC_CONFIG, 201, agnews("dev"), agnews("test", test_size)
    pool = [(t, SST2_LABELS[y]) for t, y in sst2("train", 20000, min_words=6)]
    test = [(t, SST2_LABELS[y]) for t, y in sst2("test", test_size)]
    return SST2_LABELS, "sentiment", SENTIMENT_CONFIG, 202, pool, test


class Annotators:
    """Label Studio's side of one project: webhooks out, predictions and operator figures in."""

    def __init__(self, url: str, project_id: int, config: str, control: str):
        self.url = url
        self.project = project(project_id, config, title=f"bench {project_id}")
        self.key = key_of(project_id)
        self.config = config
        self.control = control
        self.session = requests.Session()
        # reads are retried once when a kept-alive connection was closed under them
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

        self.session.mount("http://", HTTPAdapter(max_retries=Retry(total=2, connect=2, read=0, allowed_methods={"GET"})))
        self.sent = 0

    def setup(self) -> str:
        response = self.session.post(self.url + "/setup", json={"project": self.key, "schema": self.config}, timeout=120)
        response.raise_for_status()
        return response.json()["model_version"]

    def label(self, rows: list[tuple[int, str, str]]) -> None:
        for task_id, text, label in rows:
            self.sent += 1
            event = annotation_event(
                self.sent, task_id, choices(label, control=self.control), text=text,
                proj={**self.project, "total_annotations_number": self.sent}, updated=self.sent,
            )
            response = self.session.post(self.url + "/webhook", json=event, timeout=30)
            if response.status_code != 200:
                raise RuntimeError(f"webhook refused: {response.status_code} {response.text}")

    def jobs(self) -> list[dict]:
        response = self.session.get(self.url + "/jobs", params={"project": self.key}, timeout=30)
        response.raise_for_status()
        return response.json()["jobs"]

    def train(self) -> None:
        self.session.post(f"{self.url}/projects/{self.key}/train", timeout=30).raise_for_status()

    def wait_idle(self, known: int, timeout: float) -> int:
        """Wait until the project has more than ``known`` jobs and none is queued or running, twice in a
        row two seconds apart (a finished job re-queues itself when labels arrived during it)."""
        deadline = time.monotonic() + timeout
        quiet = 0
        while time.monotonic() < deadline:
            jobs = self.jobs()
            idle = len(jobs) > known and all(job["state"] in ("finished", "failed") for job in jobs)
            quiet = quiet + 1 if idle else 0
            if quiet >= 2:
                return len(jobs)
            time.sleep(2)
        raise RuntimeError(f"project {self.key}: jobs still busy after {timeout:.0f} s: {self.jobs()}")

    def versions(self) -> dict:
        response = self.session.get(f"{self.url}/projects/{self.key}/versions", timeout=30)
        response.raise_for_status()
        return response.json()

    def wait_served(self, timeout: float = 300) -> str:
        """Wait until ``/predict`` answers with the project's current version (a web worker keeps
        serving the previous one while it loads a new fine-tuned encoder)."""
        deadline = time.monotonic() + timeout
        while True:
            current = self.versions()["current"]
            response = self.session.post(
                self.url + "/predict",
                json={"tasks": [{"id": 0, "data": {"text": "probe"}}], "project": self.key, "label_config": self.config},
                timeout=120,
            )
            response.raise_for_status()
            served = response.json()["results"][0]["model_version"]
            if served == current or time.monotonic() > deadline:
                return served
            time.sleep(0.5)

    def served_accuracy(self, rows: list[tuple[str, str]]) -> tuple[float, str]:
        tasks = [{"id": 10_000_000 + i, "data": {"text": t}} for i, (t, _) in enumerate(rows)]
        response = self.session.post(
            self.url + "/predict", json={"tasks": tasks, "project": self.key, "label_config": self.config}, timeout=1800
        )
        response.raise_for_status()
        results = response.json()["results"]
        hits = sum(bool(r["result"]) and r["result"][0]["value"]["choices"][0] == gold for r, (_, gold) in zip(results, rows))
        versions = {r["model_version"] for r in results}
        if len(versions) != 1:
            raise RuntimeError(f"one /predict answered with several versions: {sorted(versions)}")
        return hits / len(rows), versions.pop()


def run_dataset(name: str, url: str, args) -> list[dict]:
    labels, control, config, project_id, pool, test = dataset(name, args.test)
    order = sample(pool, labels, min(max(args.sizes), len(pool)), args.seed)  # at least one per class first
    rows = [(i, pool[i][0], pool[i][1]) for i in order]
    annotators = Annotators(url, project_id, config, control)
    v0 = annotators.setup()
    zero_shot, served = annotators.served_accuracy(test)
    print(f"\n{name}: pool {len(pool)} texts, test {len(test)} rows; cold start {served} ({v0}): {zero_shot:.3f}", flush=True)
    out = [{"labels": 0, "version": served, "accuracy": zero_shot, "trainer": None, "seconds": 0.0}]
    jobs_seen = 0
    done = 0
    for size in sorted(args.sizes):
        batch = rows[done:size]
        started = time.monotonic()
        annotators.label(batch)
        labeled_at = time.monotonic()
        time.sleep(1)
        if len(annotators.jobs()) == jobs_seen:  # the batch triggered nothing (TRAIN_EVERY=0 or not reached)
            annotators.train()
        jobs_seen = annotators.wait_idle(jobs_seen, args.job_timeout)
        annotators.wait_served()
        served_at = time.monotonic()
        accuracy, version = annotators.served_accuracy(test)
        baseline = None
        if not args.no_trainer:
            baseline = trainer_baseline([(t, y) for _, t, y in rows[:size]], test, labels, bundled_encoder_path(), args.seed)
        info = next(v for v in annotators.versions()["versions"] if v["version"] == version)
        out.append({
            "labels": size, "version": version, "recipe": info.get("recipe") or info.get("kind"),
            "accuracy": accuracy, "trainer": baseline, "seconds": round(served_at - labeled_at, 1),
            "label_seconds": round(labeled_at - started, 1),
        })
        shown = f"{baseline:.3f}" if baseline is not None else "-"
        print(f"  {size:4d} labels: served {version} ({out[-1]['recipe']}) {accuracy:.3f}; Trainer defaults {shown}; "
              f"labels sent in {out[-1]['label_seconds']} s, served {out[-1]['seconds']} s after the last", flush=True)
        done = size
    report(name, out, zero_shot, annotators.versions())
    return out


def report(name: str, curve: list[dict], zero_shot: float, versions: dict) -> None:
    aims = AIMS[name]
    print(f"\n{name}: accuracy of the served model on the test rows, beside the baselines (same run)")
    print(f"{'labels':>6}  {'served version':<16} {'recipe':<12} {'ours':>6} {'zero-shot':>9} {'Trainer':>8} {'ours-Tr':>8}  "
          f"{'to served, s':>12}  aim")
    for point in curve[1:]:
        trainer = point["trainer"]
        gap = f"{point['accuracy'] - trainer:+.3f}" if trainer is not None else "-"
        aim = aims.get(point["labels"])
        verdict = "" if aim is None else f">= {aim:.2f} {'met' if point['accuracy'] >= aim else 'MISSED'}"
        trainer_text = f"{trainer:.3f}" if trainer is not None else "-"
        print(f"{point['labels']:>6}  {point['version']:<16} {point['recipe'] or '-':<12} {point['accuracy']:>6.3f} "
              f"{zero_shot:>9.3f} {trainer_text:>8} {gap:>8}  {point['seconds']:>12}  {verdict}")
    areas = np.mean([p["accuracy"] for p in curve[1:]])
    print(f"mean over the sizes: ours {areas:.3f}, zero-shot {zero_shot:.3f}"
          + (f", Trainer defaults {np.mean([p['trainer'] for p in curve[1:]]):.3f}" if curve[1]["trainer"] is not None else ""))

    print(f"\n{name}: every version the jobs made, with the figures on the evaluation slice "
          "(candidates, and the model serving when the job decided)")
    gated_worse = within = ungated = 0
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    for row in versions["versions"]:
        metrics = row.get("metrics") or {}
        if not metrics:
            continue
        chosen = (metrics.get(row.get("recipe") or "") or {}).get("score")
        before = (metrics.get("current") or {}).get("score")
        data = row.get("data") or {}
        sizes = ", ".join(f"{v['train']}+{v['eval']}" for v in data.values())
        tolerance = slice_tolerance(Settings(), slice_size(v["eval"] for v in data.values()))
        candidates = " ".join(f"{k} {fmt(v.get('score'))}" for k, v in metrics.items() if k != "current")
        if row["promoted"] and chosen is not None and before is not None and chosen < before - 1e-9:
            if "ungated" in (row.get("reason") or ""):
                ungated += 1
            elif not not_worse(chosen, before, tolerance):
                gated_worse += 1
            else:
                within += 1
        state = "promoted" if row["promoted"] else "kept back"
        took = f"{row['seconds']:.0f} s" if row.get("seconds") is not None else "-"
        print(f"  {row['version']:<12} {row.get('recipe') or '-':<7} {took:>6} train+slice {sizes:<9} {candidates:<26} "
              f"serving {fmt(before)}  {state}: {row.get('reason') or ''}")
    print(f"promoted below the serving model on the slice: beyond the tolerance {gated_worse}, "
          f"within it {within}, before gating starts (slice < EVAL_MIN) {ungated}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", choices=["agnews", "sst2"], default=["agnews", "sst2"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64, 128, 256],
                        help="labeled counts after each batch (default 16 32 64 128 256)")
    parser.add_argument("--test", type=int, default=1000, help="test rows scored per point (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-trainer", action="store_true", help="skip the transformers.Trainer baseline")
    parser.add_argument("--job-timeout", type=float, default=3600, help="seconds to wait for a batch's jobs")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="a backend setting (repeatable), e.g. --env TRAIN_MODE=frozen")
    args = parser.parse_args(argv)
    if not DATA.exists():
        print(f"skipped: {DATA} (../shared/data) is not here")
        return 0
    env = {"WEB_WORKERS": "1"}
    for item in args.env:
        name, _, value = item.partition("=")
        env[name] = value
    with tempfile.TemporaryDirectory() as root:
        server = BackendServer(Path(root) / "models", env=env).start(timeout=300)
        try:
            print(f"backend at {server.url}; settings: {env}")
            for name in args.datasets:
                run_dataset(name, server.url, args)
        except Exception:
            print("backend log (last 60 lines):\n" + "\n".join(server.log().splitlines()[-60:]), file=sys.stderr)
            raise
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
