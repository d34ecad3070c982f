"""Where the time of a one-task ``/predict`` goes: the floor under single-task latency.

Usage::

    .venv/bin/python bench/latency_floor.py [--requests 40] [--torch-threads 2]

In this process, through the Flask app (no HTTP), one AG News test text per request, for each
``INFERENCE_PRECISION`` the machine can run (float32, and bfloat16): the p50 request time, and the
share of it spent in the encoder's linear layers (``torch.nn.functional.linear``, from cProfile),
which read every weight of the encoder once per forward pass.  Beside it, the same texts through a
warm ``transformers.pipeline`` (baseline (b) of ``bench/predict.py``), request by request interleaved
with ours, and the ratio of the p50s.  What a request costs beyond
the forward pass over HTTP is ``bench/predict.py``'s figure minus this one.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.data import DATA, agnews  # noqa: E402
from tests.support.events import TOPIC_CONFIG  # noqa: E402


def p50(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def served(precision: str, texts: list[str]):
    """A warm Flask test client serving ``precision``, and one request body per text."""
    from ls_backend.api import create_app
    from ls_backend.settings import Settings

    settings = Settings.from_env({"MODEL_DIR": tempfile.mkdtemp(), "INFERENCE_PRECISION": precision, "SYNC_CHECK_INTERVAL": "0"})
    client = create_app(settings).test_client()
    client.post("/setup", json={"project": "1.1", "schema": TOPIC_CONFIG})
    bodies = [{"project": "1.1", "label_config": TOPIC_CONFIG, "tasks": [{"id": i, "data": {"text": t}}]}
              for i, t in enumerate(texts)]
    for body in bodies[:5]:
        client.post("/predict", json=body)
    return client, bodies


def in_linear_layers(client, bodies: list[dict]) -> float:
    """ms per request inside the encoder's linear layers (cProfile)."""
    profile = cProfile.Profile()
    profile.enable()
    for body in bodies:
        client.post("/predict", json=body)
    profile.disable()
    linear = sum(stat[2] for key, stat in pstats.Stats(profile).stats.items() if key[2] == "<built-in method torch._C._nn.linear>")
    return 1000 * linear / len(bodies)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--torch-threads", type=int, default=2)
    args = parser.parse_args(argv)
    if not DATA.exists():
        print(f"skipped: {DATA} (../shared/data) is not here")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import pipeline

    from ls_backend.precision import cpu_has_native_bf16
    from ls_backend.settings import bundled_encoder_path

    torch.set_num_threads(args.torch_threads)
    texts = [t for t, _ in agnews("test", args.requests + 10, offset=10)][10:]
    warm = pipeline("text-classification", model=bundled_encoder_path(), device="cpu")
    warm(texts[:5])
    precisions = ["float32"] + (["bfloat16"] if cpu_has_native_bf16() else [])
    ours = {precision: served(precision, texts) for precision in precisions}
    # interleaved, text by text: a burst of load on this shared machine lands on every contender alike
    times: dict[str, list[float]] = {"pipeline": [], **{precision: [] for precision in precisions}}
    for i, text in enumerate(texts):
        started = time.perf_counter()
        warm([text])
        times["pipeline"].append(time.perf_counter() - started)
        for precision, (client, bodies) in ours.items():
            started = time.perf_counter()
            response = client.post("/predict", json=bodies[i])
            times[precision].append(time.perf_counter() - started)
            assert response.status_code == 200, response.get_json()
    baseline = 1000 * p50(times["pipeline"])
    print(f"{args.requests} one-task requests, in process (no HTTP), {args.torch_threads} torch threads, interleaved; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"warm transformers.pipeline (float32): p50 {baseline:.1f} ms")
    for precision, (client, bodies) in ours.items():
        request = 1000 * p50(times[precision])
        print(f"ours, INFERENCE_PRECISION={precision}: p50 {request:.1f} ms per request "
              f"({baseline / request:.2f}x the pipeline's speed), {in_linear_layers(client, bodies):.1f} ms of it "
              "in linear layers")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
