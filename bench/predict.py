"""Prediction speed and zero-shot accuracy of the served backend, beside two baselines.

Usage::

    .venv/bin/python bench/predict.py [--n 1000] [--latency-requests 50] [--repeats 3]
    python3 bench/predict.py --baseline-device cuda   # a GPU machine: the baselines on the same card

The backend is started the way the README starts it (``ls-backend serve``, through
``tests/support/backend.py``) with one web worker, so that the comparison is one
process against one process.  Everything of ours is measured through the HTTP API:

* throughput: ``--n`` real AG News texts in ONE ``POST /predict``;
* latency: p50/p95 of sequential one-task ``POST /predict`` requests.

The baselines run in this process, on the same model folder (the bundled encoder),
with as many torch threads as the server's worker uses:

* (a) what Label Studio's example backends do: a ``transformers.pipeline(
  "text-classification")`` built inside every predict call, then called on the task
  texts with its default batch size (one text at a time);
* (b) the same pipeline built once and kept warm, default batch size.

The pipeline's classification head is randomly initialised (the encoder folder has
none): only speed is compared.  Baseline latencies are measured without HTTP, which
favours the baselines.  Throughput figures are the best of ``--repeats`` runs, the
three contenders interleaved, because other work on a shared machine adds noise.

Also printed: zero-shot accuracy of the served cold-start model (``v0``) on the
first ``--n`` rows of agnews/test.tsv, and on sst2/test.tsv with a Positive/Negative
config.  Skips (exit 0) with a message when ../shared/data is absent.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.support.data import AGNEWS_LABELS  # noqa: E402
from tests.support.events import SENTIMENT_CONFIG, TOPIC_CONFIG  # noqa: E402

TOPIC_PROJECT = "101.1764200000"
SENTIMENT_PROJECT = "102.1764200000"

# throughput target against (b), latency target against (a), from issue 2
THROUGHPUT_TARGET = 2.0
LATENCY_TARGET = 20.0


def read_tsv(path: Path, header: bool) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        if header:
            next(reader)
        return [row for row in reader if row]


def agnews_rows(limit: int) -> list[tuple[str, str]]:
    rows = [(r[0], r[1]) for r in read_tsv(DATA / "agnews" / "test.tsv", header=False)[:limit]]
    unknown = sorted({label for _, label in rows} - set(AGNEWS_LABELS))
    if unknown:
        raise SystemExit(f"bench: agnews/test.tsv has labels {unknown}, expected names among {AGNEWS_LABELS}")
    return rows


def sst2_rows() -> list[tuple[str, str]]:
    names = {"0": "Negative", "1": "Positive"}
    rows = []
    for sentence, label in read_tsv(DATA / "sst2" / "test.tsv", header=True):
        if label not in names:
            raise SystemExit(f"bench: sst2/test.tsv has label {label!r}, expected 0 or 1")
        rows.append((sentence.strip(), names[label]))
    return rows


def tasks_for(texts: list[str]) -> list[dict]:
    return [{"id": i + 1, "data": {"text": text}} for i, text in enumerate(texts)]


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q))


class Client:
    """Label Studio's calls, as it makes them (one requests session, JSON bodies)."""

    def __init__(self, url: str, auth=None):
        import requests

        self.url = url
        self.session = requests.Session()
        self.session.auth = auth
        self.server_seconds = float("nan")

    def setup(self, project: str, config: str) -> str:
        response = self.session.post(self.url + "/setup", json={"project": project, "schema": config}, timeout=120)
        response.raise_for_status()
        return response.json()["model_version"]

    def predict(self, project: str, config: str, tasks: list[dict]) -> list[dict]:
        body = {"tasks": tasks, "project": project, "label_config": config, "params": {"context": None}}
        response = self.session.post(self.url + "/predict", data=json.dumps(body), timeout=600,
                                     headers={"Content-Type": "application/json"})
        response.raise_for_status()
        # the server's own time for the request (its Server-Timing header), in seconds
        timing = response.headers.get("Server-Timing", "")
        self.server_seconds = float(timing.split("dur=")[1]) / 1000 if "dur=" in timing else float("nan")
        results = response.json()["results"]
        if len(results) != len(tasks):
            raise RuntimeError(f"/predict answered {len(results)} entries for {len(tasks)} tasks")
        return results


def chosen(entry: dict) -> str | None:
    for item in entry.get("result", []):
        if item.get("type") == "choices":
            return item["value"]["choices"][0]
    return None


def accuracy(results: list[dict], labels: list[str]) -> float:
    return sum(chosen(r) == y for r, y in zip(results, labels)) / len(labels)


def server_threads(server_log: str, fallback: int) -> int:
    # "ls-backend serving on http://... (1 web workers x 2 torch threads, ...)"
    marker = " torch threads"
    for line in server_log.splitlines():
        if marker in line and " x " in line:
            try:
                return int(line.split(marker)[0].rsplit(" x ", 1)[1])
            except ValueError:
                break
    return fallback


def server_precision(url: str, auth) -> str:
    """The device and precision the server's web worker serves with, from its /health."""
    import requests

    body = requests.get(url + "/health", auth=auth, timeout=10).json()
    return f"{body.get('device', '?')} {body.get('precision', '?')}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="texts in the throughput request (default 1000)")
    parser.add_argument("--latency-requests", type=int, default=50, help="one-task requests per contender (default 50)")
    parser.add_argument("--cold-latency-requests", type=int, default=None,
                        help="one-task calls for baseline (a), which rebuilds the pipeline each time (default: as --latency-requests)")
    parser.add_argument("--repeats", type=int, default=3, help="throughput runs per contender; the best counts (default 3)")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="TORCH_THREADS for the server, and so for the baselines (default: the server's own choice)")
    parser.add_argument("--baseline-device", default="cpu",
                        help="where the pipeline baselines run (cpu; cuda beside a server on a GPU)")
    parser.add_argument("--no-accuracy", action="store_true", help="skip the SST-2 accuracy figure")
    args = parser.parse_args(argv)

    if not (DATA / "agnews" / "test.tsv").exists():
        print(f"bench: skipped: real data {DATA} is absent (it lives in ../shared/data beside the repository)")
        return 0

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import pipeline
    from transformers.utils import logging as hf_logging

    from ls_backend.settings import Settings, bundled_encoder_path
    from tests.support.backend import BackendServer

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    rows = agnews_rows(args.n)
    texts = [t for t, _ in rows]
    labels = [y for _, y in rows]
    model_path = bundled_encoder_path()
    n_lat = min(args.latency_requests, len(texts))
    n_cold = min(args.cold_latency_requests or n_lat, len(texts))
    single_texts = texts[:n_lat]

    server_env = {"WEB_WORKERS": "1", "LOG_LEVEL": "WARNING"}
    if args.torch_threads:
        server_env["TORCH_THREADS"] = str(args.torch_threads)
    settings = Settings.from_env({**os.environ, **server_env})
    # what `ls-backend serve` gives its one worker unless TORCH_THREADS says otherwise; the
    # server's start-up line says what it really used, and that is what the baselines get
    expected_threads = settings.torch_threads or os.cpu_count() or 1

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="ls-backend-bench-") as tmp:
        server = BackendServer(Path(tmp) / "models", env=server_env)
        started = time.perf_counter()
        server.start()
        print(f"backend up in {time.perf_counter() - started:.1f} s at {server.url} (WEB_WORKERS=1)")
        try:
            threads = server_threads(server.log(), expected_threads)
            torch.set_num_threads(threads)
            precision = server_precision(server.url, server.auth)
            print(f"torch threads: server worker {threads}, baselines {torch.get_num_threads()} "
                  f"({os.cpu_count()} cores); model {model_path}")
            print(f"server device and precision: {precision} (DEVICE, INFERENCE_PRECISION); baselines fp32 (pipeline default) on {args.baseline_device}")
            print(f"texts: first {len(texts)} rows of agnews/test.tsv; batch size {settings.batch_size}, "
                  f"max length {settings.max_length} on our side")

            client = Client(server.url, server.auth)
            version = client.setup(TOPIC_PROJECT, TOPIC_CONFIG)
            client.predict(TOPIC_PROJECT, TOPIC_CONFIG, tasks_for(texts[:64]))  # warm-up

            warm = pipeline("text-classification", model=model_path, device=args.baseline_device)
            warm(texts[:8])  # warm-up

            def cold_predict(batch: list[str]):
                # Label Studio's examples: the pipeline is built inside predict()
                pipe = pipeline("text-classification", model=model_path, device=args.baseline_device)
                return pipe(batch)

            # -- throughput: one request / call with all texts, contenders interleaved
            ours_s, warm_s, cold_s = [], [], []
            all_tasks = tasks_for(texts)
            results = None
            for rep in range(args.repeats):
                t0 = time.perf_counter()
                results = client.predict(TOPIC_PROJECT, TOPIC_CONFIG, all_tasks)
                ours_s.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                warm(texts)
                warm_s.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                cold_predict(texts)
                cold_s.append(time.perf_counter() - t0)
                print(f"  throughput run {rep + 1}/{args.repeats}: ours {len(texts) / ours_s[-1]:.1f}, "
                      f"(b) warm {len(texts) / warm_s[-1]:.1f}, (a) per-call {len(texts) / cold_s[-1]:.1f} texts/s")
            assert results is not None
            versions = {r["model_version"] for r in results}
            topic_acc = accuracy(results, labels)

            # -- latency: sequential one-task requests
            ours_lat, server_lat, warm_lat, cold_lat = [], [], [], []
            for text in single_texts:
                task = tasks_for([text])
                t0 = time.perf_counter()
                client.predict(TOPIC_PROJECT, TOPIC_CONFIG, task)
                ours_lat.append(time.perf_counter() - t0)
                server_lat.append(client.server_seconds)
                t0 = time.perf_counter()
                warm([text])
                warm_lat.append(time.perf_counter() - t0)
            for text in texts[:n_cold]:
                t0 = time.perf_counter()
                cold_predict([text])
                cold_lat.append(time.perf_counter() - t0)

            sst_acc = None
            if not args.no_accuracy and (DATA / "sst2" / "test.tsv").exists():
                sst = sst2_rows()
                client.setup(SENTIMENT_PROJECT, SENTIMENT_CONFIG)
                sst_results = client.predict(SENTIMENT_PROJECT, SENTIMENT_CONFIG, tasks_for([t for t, _ in sst]))
                sst_acc = (accuracy(sst_results, [y for _, y in sst]), len(sst))
        finally:
            server.stop()

    load_after = os.getloadavg()
    n = len(texts)
    ours_tp, warm_tp, cold_tp = n / min(ours_s), n / min(warm_s), n / min(cold_s)
    lat = {
        "ours": (percentile(ours_lat, 50), percentile(ours_lat, 95)),
        "warm": (percentile(warm_lat, 50), percentile(warm_lat, 95)),
        "cold": (percentile(cold_lat, 50), percentile(cold_lat, 95)),
    }

    def ok(ratio: float, target: float | None) -> str:
        if target is None:
            return ""
        return f">= {target:g}x  {'MET' if ratio >= target else 'MISSED'}"

    table = [
        ("throughput, tasks/s", f"{ours_tp:.1f}", "(b) warm pipeline", f"{warm_tp:.1f}", ours_tp / warm_tp, THROUGHPUT_TARGET),
        ("throughput, tasks/s", f"{ours_tp:.1f}", "(a) pipeline per call", f"{cold_tp:.1f}", ours_tp / cold_tp, None),
        ("1-task latency p50, ms", f"{lat['ours'][0] * 1e3:.1f}", "(a) pipeline per call", f"{lat['cold'][0] * 1e3:.1f}",
         lat["cold"][0] / lat["ours"][0], LATENCY_TARGET),
        ("1-task latency p95, ms", f"{lat['ours'][1] * 1e3:.1f}", "(a) pipeline per call", f"{lat['cold'][1] * 1e3:.1f}",
         lat["cold"][1] / lat["ours"][1], LATENCY_TARGET),
        ("1-task latency p50, ms", f"{lat['ours'][0] * 1e3:.1f}", "(b) warm pipeline", f"{lat['warm'][0] * 1e3:.1f}",
         lat["warm"][0] / lat["ours"][0], None),
        ("1-task latency p95, ms", f"{lat['ours'][1] * 1e3:.1f}", "(b) warm pipeline", f"{lat['warm'][1] * 1e3:.1f}",
         lat["warm"][1] / lat["ours"][1], None),
    ]
    print()
    print(f"{n} texts in one /predict (best of {args.repeats}); latency over {n_lat} sequential one-task requests "
          f"({n_cold} for (a)); torch threads {threads} everywhere; ours over HTTP, baselines in-process")
    header = f"{'measure':<24}{'ours':>9}  {'baseline':<23}{'baseline':>9}{'ratio':>8}  target"
    print(header)
    print("-" * len(header))
    for measure, ours, name, base, ratio, target in table:
        print(f"{measure:<24}{ours:>9}  {name:<23}{base:>9}{ratio:>7.2f}x  {ok(ratio, target)}")
    print("ratio: ours/baseline for throughput, baseline/ours for latency")
    print(f"of our one-task p50, the server's own time (its Server-Timing header: reading the config, predicting, "
          f"the JSON answer): p50 {percentile(server_lat, 50) * 1e3:.1f} ms; the rest is HTTP and the client")
    cores = os.cpu_count() or 1
    print(f"1-minute load average {load_before[0]:.1f} before, {load_after[0]:.1f} after, on {cores} cores"
          + (": the machine was busy with other work, so absolute figures are low and noisy; the contenders ran"
             " interleaved, so the ratios are the figures to read" if max(load_before[0], load_after[0]) > cores else ""))
    print()
    print(f"zero-shot accuracy, served {version} ({', '.join(sorted(versions))}): "
          f"agnews/test.tsv first {n} rows {topic_acc:.3f} (chance 0.25)")
    if sst_acc is not None:
        print(f"zero-shot accuracy, Positive/Negative config: sst2/test.tsv {sst_acc[1]} rows {sst_acc[0]:.3f} (chance 0.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
