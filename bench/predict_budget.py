"""What ``PREDICT_TIME_BUDGET`` costs a ``/predict`` call, and whether a call keeps to it.

Usage::

    .venv/bin/python bench/predict_budget.py [--n 2000] [--repeats 4] [--budget 10]

In this process, with the bundled encoder and the cold-start heads of an AG News topic config
(the predictor a web worker runs, without HTTP):

* throughput of one call over ``--n`` AG News texts predicted in runs sized by the call's pace
  (what a budget that the call stays inside does: ``PREDICT_TIME_BUDGET`` 70 s) beside the
  same call in one run (``PREDICT_TIME_BUDGET=0``, the baseline), interleaved (which goes first
  alternates), best of ``--repeats``: the ratio is what the runs cost;
* a call over ``--n`` copies of the longest texts of the file (each ``MAX_LENGTH`` tokens or
  more) with a ``--budget`` too short for them all: how long it took beside the budget, and
  how many tasks it answered with predictions (the others get an entry without ``result``).

Skips (exit 0) with a message when ../shared/data is absent.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.predict import agnews_rows, tasks_for  # noqa: E402
from tests.support.events import TOPIC_CONFIG  # noqa: E402

PROJECT = "103.1764200000"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--budget", type=float, default=10.0, help="seconds, for the call that cannot finish")
    args = parser.parse_args()
    if not (DATA / "agnews" / "test.tsv").exists():
        print(f"skipped: {DATA / 'agnews'} (../shared/data) is not here")
        return 0
    import tempfile

    import torch

    from ls_backend.predictor import Predictor
    from ls_backend.settings import Settings

    texts = [text for text, _ in agnews_rows(args.n)]
    with tempfile.TemporaryDirectory(prefix="ls-backend-bench-") as tmp:
        settings = Settings(model_dir=Path(tmp) / "models")
        predictor = Predictor(settings)
        tasks = tasks_for(texts)
        predictor.predict(PROJECT, TOPIC_CONFIG, tasks[:64])  # warm-up
        print(f"{len(texts)} AG News texts, batch size {settings.batch_size}, max length {settings.max_length}, "
              f"torch threads {torch.get_num_threads()}, device {predictor.device.type}")
        runs, whole = [], []
        for rep in range(args.repeats):
            for paced_first in ((True, False) if rep % 2 == 0 else (False, True)):  # alternated: no order bias
                t0 = time.perf_counter()
                if paced_first:
                    paced = predictor.predict(PROJECT, TOPIC_CONFIG, tasks, deadline=t0 + 70.0)
                    runs.append(time.perf_counter() - t0)
                else:
                    one = predictor.predict(PROJECT, TOPIC_CONFIG, tasks)
                    whole.append(time.perf_counter() - t0)
            assert all("result" in entry for entry in paced), "the budgeted call did not finish: raise --n's budget"
            same = sum(a["result"][0]["value"] == b["result"][0]["value"] for a, b in zip(paced, one))
            print(f"  run {rep + 1}/{args.repeats}: in runs {len(tasks) / runs[-1]:.1f}, in one run "
                  f"{len(tasks) / whole[-1]:.1f} tasks/s; the same suggestion for {same} of {len(tasks)}")
        ours, baseline = len(tasks) / min(runs), len(tasks) / min(whole)
        print(f"throughput: in runs (PREDICT_TIME_BUDGET=70) {ours:.1f} tasks/s, in one run (0) {baseline:.1f} "
              f"tasks/s: ratio {ours / baseline:.2f}")

        longest = sorted(texts, key=len, reverse=True)[:50]
        heavy = tasks_for([longest[i % len(longest)] * 4 for i in range(args.n)])
        t0 = time.perf_counter()
        answered = predictor.predict(PROJECT, TOPIC_CONFIG, heavy, deadline=t0 + args.budget)
        took = time.perf_counter() - t0
        made = sum("result" in entry for entry in answered)
        print(f"a call that cannot finish: budget {args.budget:g} s, answered in {took:.2f} s "
              f"({took / args.budget:.2f} of the budget) with {made} of {len(heavy)} tasks predicted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
