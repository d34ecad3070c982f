"""Training speed of our trainer beside ``transformers.Trainer``, the fast head, and the labeling-loop latency.

Usage::

    .venv/bin/python bench/training.py [--rows 256] [--labels 50,200,1000] [--batch 10] [--skip-throughput] [--skip-loop]

(a) Throughput, in this process, on the bundled encoder, the same ``--rows`` real AG News
    dev rows for both contenders and the same number of examples (``--rows`` x 3):

    * ours: ``ls_backend.trainer.fine_tune`` (encoder + head, batch 16, max_length 128, warm
      start from the zero-shot head), ``ceil(rows * 3 / 16)`` steps;
    * ``transformers.Trainer`` with default ``TrainingArguments`` (only ``output_dir``,
      ``report_to="none"`` and no checkpoint or log writes set: 3 epochs, batch 8, AdamW, lr 5e-5), on
      ``AutoModelForSequenceClassification`` from the same folder; the texts tokenized up
      front (truncation at 128), padded per batch by the default collator.

    examples/s = examples / wall seconds of the whole training call (ours includes its
    tokenization; Trainer's its set-up).  The two alternate ``--repeats`` times; the best of
    each is printed.  With a CUDA device the same runs are repeated in bf16 (ours also at
    batch 256, on ``--gpu-rows`` rows) and our sequences/s are given as a fraction of
    10,000 sequences/s (an H100 running this encoder's training step at 128 tokens, bf16,
    batch 256).

    Also: ``fit_head`` (the fast head of a job) for ``--head-labels`` labels, on cached
    embeddings, and with re-encoding the texts first (what a job does today).

(b) Loop latency through the HTTP API of ``ls-backend serve`` (started by
    ``tests/support/backend.py``; embedded job runner, no Redis; ``TRAIN_MODE=frozen``;
    ``FORCE_PROMOTE=true`` so that every job's version goes live, the gate's evaluation still
    runs).  For each N of ``--labels``: (1) the first job: ``TRAIN_EVERY`` = N, N - 1 labels are
    sent by webhook first (no job), then the clock runs from sending the N-th label's webhook to
    ``/setup`` answering the new version; (2) a batch in a running loop (``--batch`` B, the
    default ``TRAIN_EVERY`` of 10): ``TRAIN_EVERY`` = B, the N labels are sent and trained by the
    jobs they trigger, then B - 1 more, and the clock runs from the B-th one's webhook.  Each is
    run with the fast lane's job process started ahead (``JOB_STANDBY``, the default) and, as
    the baseline in the same run, without (a process started for the job, importing
    torch/transformers first).  The job record splits the time: webhook -> queued, queued ->
    started (runner poll), started -> ended (imports where not done ahead, encoder load,
    embedding, head fit, evaluation, registry write), ended -> ``/setup`` (web workers check
    ``current`` every ``VERSION_CHECK_INTERVAL``).

Skips (exit 0) with a message when ../shared/data is absent.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.support.data import AGNEWS_LABELS  # noqa: E402
from tests.support.events import TOPIC_CONFIG  # noqa: E402

REFERENCE_SEQ_PER_S = 10_000  # H100, this encoder's training step, 128 tokens, bf16, batch 256
TRAINER_EPOCHS = 3  # transformers.TrainingArguments' default num_train_epochs


def dev_rows(n: int, balanced: bool = False) -> list[tuple[str, str]]:
    """The first ``n`` rows of agnews/dev.tsv, or ``n`` rows taking at most ceil(n/4) of each topic."""
    cap = math.ceil(n / len(AGNEWS_LABELS)) if balanced else n
    taken: Counter = Counter()
    rows = []
    with open(DATA / "agnews" / "dev.tsv", newline="", encoding="utf-8") as handle:
        for text, label in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
            if taken[label] < cap:
                taken[label] += 1
                rows.append((text, label))
            if len(rows) == n:
                return rows
    raise SystemExit(f"agnews/dev.tsv has fewer than {n} usable rows")


# -- (a) throughput ----------------------------------------------------------------------
def run_ours(encoder, head, rows, batch_size: int, max_length: int) -> dict:
    from ls_backend.trainer import ControlData, TrainingArguments, fine_tune

    data = ControlData("topic", list(AGNEWS_LABELS), False, [t for t, _ in rows], [(label,) for _, label in rows])
    examples = len(rows) * TRAINER_EPOCHS
    steps = math.ceil(examples / batch_size)
    args = TrainingArguments(mode="full", batch_size=batch_size, max_length=max_length, epochs=1, min_steps=steps)
    _sync(encoder.device)
    started = time.perf_counter()
    _, _, report = fine_tune(encoder, {"topic": head}, [data], args)
    _sync(encoder.device)
    seconds = time.perf_counter() - started
    seen = report["examples_seen"]
    return {"examples": seen, "steps": report["steps"], "seconds": seconds, "per_s": seen / seconds,
            "loop_per_s": report["examples_per_second"], "loss": report["final_loss"]}


def run_trainer(model_path: str, rows, max_length: int, device, bf16: bool = False) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    index = {label: i for i, label in enumerate(AGNEWS_LABELS)}
    encoded = tokenizer([t for t, _ in rows], truncation=True, max_length=max_length)
    dataset = [
        {"input_ids": ids, "attention_mask": mask, "labels": index[label]}
        for ids, mask, (_, label) in zip(encoded["input_ids"], encoded["attention_mask"], rows)
    ]
    torch.manual_seed(13)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=len(AGNEWS_LABELS))
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as out:
        extra: dict = {"bf16": True} if bf16 else {}
        if getattr(device, "type", "cpu") == "cpu" and torch.cuda.is_available():
            extra["use_cpu"] = True  # the CPU comparison on a machine that also has a GPU
        # no checkpoint or log writes inside the timed call: ours writes none either
        args = TrainingArguments(output_dir=out, report_to="none", save_strategy="no", logging_strategy="no", **extra)
        trainer = Trainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        _sync(device)
        started = time.perf_counter()
        result = trainer.train()
        _sync(device)
        seconds = time.perf_counter() - started
    examples = len(dataset) * int(args.num_train_epochs)
    return {"examples": examples, "steps": result.global_step, "seconds": seconds, "per_s": examples / seconds,
            "batch": args.per_device_train_batch_size, "loop_per_s": result.metrics.get("train_samples_per_second"),
            "loss": round(result.training_loss, 4)}


def _sync(device) -> None:
    import torch

    if getattr(device, "type", "cpu") == "cuda":
        torch.cuda.synchronize()


def best(runs: list[dict]) -> dict:
    return max(runs, key=lambda r: r["per_s"])


def throughput(device_name: str, rows, repeats: int, batch_size: int = 16, max_length: int = 128,
               extra_batches: tuple[int, ...] = ()) -> dict:
    from ls_backend.labeling import plan_for
    from ls_backend.model import Encoder, zero_shot_head
    from ls_backend.settings import bundled_encoder_path

    path = bundled_encoder_path()
    encoder = Encoder(path, device_name, max_length)
    head = zero_shot_head(plan_for(TOPIC_CONFIG).control("topic"), encoder, "{label}", 0.05, 0.5)
    lengths = [len(ids) for ids in encoder.tokenize([t for t, _ in rows], max_length)]
    ours, theirs, wide = [], [], {b: [] for b in extra_batches}
    for _ in range(repeats):
        ours.append(run_ours(encoder, head, rows, batch_size, max_length))
        theirs.append(run_trainer(path, rows, max_length, encoder.device, bf16=encoder.device.type == "cuda"))
        for b in extra_batches:
            wide[b].append(run_ours(encoder, head, rows, b, max_length))
    return {"ours": best(ours), "trainer": best(theirs), "wide": {b: best(r) for b, r in wide.items()},
            "mean_tokens": sum(lengths) / len(lengths), "device": encoder.device.type}


def print_throughput(figures: dict, rows: int, repeats: int, batch_size: int) -> None:
    ours, theirs = figures["ours"], figures["trainer"]
    print(f"\n## Training throughput on {figures['device']} ({rows} AG News dev rows x {TRAINER_EPOCHS} = "
          f"{rows * TRAINER_EPOCHS} examples each, mean {figures['mean_tokens']:.0f} tokens per text, "
          f"max_length 128, best of {repeats})")
    print(f"{'contender':<44}{'batch':>6}{'steps':>7}{'seconds':>9}{'examples/s':>12}{'loop-only/s':>13}{'loss':>8}")
    line = "{:<44}{:>6}{:>7}{:>9.1f}{:>12.1f}{:>13}{:>8}"
    print(line.format("ours: ls_backend.trainer.fine_tune", batch_size, ours["steps"], ours["seconds"], ours["per_s"],
                      f"{ours['loop_per_s']:.1f}" if ours["loop_per_s"] else "-", ours["loss"]))
    print(line.format("transformers.Trainer, default arguments" + (" + bf16" if figures["device"] == "cuda" else ""),
                      theirs["batch"], theirs["steps"], theirs["seconds"], theirs["per_s"],
                      f"{theirs['loop_per_s']:.1f}" if theirs["loop_per_s"] else "-", theirs["loss"]))
    for b, run in figures["wide"].items():
        print(line.format(f"ours at batch {b}", b, run["steps"], run["seconds"], run["per_s"],
                          f"{run['loop_per_s']:.1f}" if run["loop_per_s"] else "-", run["loss"]))
    print(f"ratio ours / Trainer: {ours['per_s'] / theirs['per_s']:.2f}x")
    if figures["device"] == "cuda":
        for name, run in [(f"batch {batch_size}", ours)] + [(f"batch {b}", r) for b, r in figures["wide"].items()]:
            print(f"ours ({name}): {run['per_s']:.0f} sequences/s = {run['per_s'] / REFERENCE_SEQ_PER_S:.1%} of "
                  f"{REFERENCE_SEQ_PER_S:,} sequences/s (texts here average {figures['mean_tokens']:.0f} tokens, "
                  "padded per batch, not 128)")


def head_timing(labels: int) -> None:
    import numpy as np

    from ls_backend.labeling import plan_for
    from ls_backend.model import Encoder, resolve_device, zero_shot_head
    from ls_backend.settings import Settings, bundled_encoder_path
    from ls_backend.trainer import ControlData, fit_head

    settings = Settings()
    encoder = Encoder(bundled_encoder_path(), resolve_device(settings.device), settings.max_length)
    prior = zero_shot_head(plan_for(TOPIC_CONFIG).control("topic"), encoder, "{label}", 0.05, 0.5)
    rows = dev_rows(labels, balanced=True)
    data = ControlData("topic", list(AGNEWS_LABELS), False, [t for t, _ in rows], [(label,) for _, label in rows])
    encoder.encode(data.texts[:32], settings.batch_size)  # warm-up
    started = time.perf_counter()
    embeddings = encoder.encode(data.texts, settings.batch_size)
    encode_s = time.perf_counter() - started
    started = time.perf_counter()
    _, report = fit_head(np.asarray(embeddings), data, prior)
    fit_s = time.perf_counter() - started
    print(f"\n## Fast head (fit_head) for {labels} labels on {encoder.device.type} "
          f"(max_length {settings.max_length}, encode batch {settings.batch_size})")
    print(f"{'path':<40}{'seconds':>9}")
    print(f"{'cached embeddings: fit_head only':<40}{fit_s:>9.2f}")
    print(f"{'re-encoding: encode + fit_head':<40}{encode_s + fit_s:>9.2f}   (encode {encode_s:.2f} s)")
    print(f"re-encoding costs {(encode_s + fit_s) / fit_s:.1f}x the cached path; chosen regulariser "
          f"{report['prior']} l2={report['l2']:.4g}, cv accuracy {report['cv_accuracy']:.3f}")


# -- (b) loop latency ----------------------------------------------------------------------
def loop_latency(n: int, workdir: Path, batch: int = 0, standby: bool = True) -> dict:
    from tests.support.backend import BackendServer
    from tests.support.loop import LoopClient

    rows = dev_rows(n + batch, balanced=True)
    labeled = [(task_id, text, label) for task_id, (text, label) in enumerate(rows, start=1)]
    env = {
        "REDIS_URL": "",
        "TRAIN_EVERY": str(batch or n),
        "TRAIN_MODE": "frozen",
        "FORCE_PROMOTE": "true",
        "SYNC_CHECK_INTERVAL": "0",
        "LABEL_STUDIO_URL": "",
        "LABEL_STUDIO_API_KEY": "",
        "LOG_LEVEL": "WARNING",
        "JOB_STANDBY": "true" if standby else "false",
    }
    with BackendServer(workdir / f"models-{n}-{batch}-{standby}", env=env) as server:
        loop = LoopClient(server.url, project_id=7)
        cold = loop.setup()
        started = time.perf_counter()
        if batch:  # the first n labels are trained by the jobs they trigger; then one more batch is timed
            loop.label(labeled[:n], first_annotation_id=1)
            loop.wait_idle(timeout=1800)
            time.sleep(2)  # past VERSION_CHECK_INTERVAL (1 s)
            cold = loop.setup()
            ahead = labeled[n:-1]
        else:
            ahead = labeled[:-1]
        jobs_before = len(loop.jobs())
        loop.label(ahead, first_annotation_id=len(labeled) - len(ahead))
        send_s = time.perf_counter() - started
        if len(loop.jobs()) != jobs_before:
            raise SystemExit(f"labels before the timed one already queued a job: {loop.jobs()}")
        # the lane has been idle a while, as between two batches of a team's labels: time for the
        # runner to start its next job process (JOB_STANDBY) and for that to import what a job needs
        time.sleep(8)
        sent_at = time.time()
        started = time.perf_counter()
        loop.label(labeled[-1:], first_annotation_id=len(labeled))
        while True:
            version = loop.setup()
            if version != cold:
                break
            if time.perf_counter() - started > 1800:
                raise SystemExit(f"no new version after 30 minutes: {loop.jobs()}\n{server.log()}")
            time.sleep(0.1)
        latency = time.perf_counter() - started
        answered_at = time.time()
        # the job process promotes the version, then the runner records the job's end: wait for that
        deadline = time.monotonic() + 120
        while True:
            jobs = loop.jobs()
            job = next((j for j in jobs if j["version"] == version), None)
            if job is not None or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if job is None:
            raise SystemExit(f"no finished job made {version}: {jobs}")
        from ls_backend.registry import ModelRegistry

        promoted_at = (ModelRegistry(server.model_dir).project_dir(loop.key) / "current").stat().st_mtime
    result = job.get("result") or {}
    return {
        "labels": n,
        "batch": batch,
        "standby": bool((result.get("process") or {}).get("started_ahead")),
        "ready_s": (result.get("process") or {}).get("waited_for_job_s"),
        "latency": latency,
        "send_prior_s": send_s,
        "to_queue": job["enqueued_at"] - sent_at,
        "queue_wait": job["started_at"] - job["enqueued_at"],
        "job": promoted_at - job["started_at"],
        "training": result.get("seconds"),
        "pickup": answered_at - promoted_at,
        "jobs": len(jobs),
        "version": version,
        "train_labels": result.get("labels"),
    }


def print_latency(rows: list[dict], device: str) -> None:
    print(f"\n## Loop latency on {device}: webhook of the label that triggers a job -> /setup answers the new "
          "version (embedded runner, TRAIN_MODE=frozen)")
    head = ("labels", "batch", "standby", "latency s", "->queued", "queue wait", "job s", "of which run", "->/setup",
            "jobs", "version")
    print("{:>7}{:>7}{:>12}{:>11}{:>10}{:>12}{:>8}{:>14}{:>10}{:>6}{:>10}".format(*head))
    for r in rows:
        ready = f"yes ({r['ready_s']:.0f} s)" if r["standby"] and r["ready_s"] is not None else "yes" if r["standby"] else "no"
        print("{:>7}{:>7}{:>12}{:>11.1f}{:>10.2f}{:>12.2f}{:>8.1f}{:>14}{:>10.2f}{:>6}{:>10}".format(
            r["labels"], r["batch"] or "-", ready, r["latency"], r["to_queue"],
            r["queue_wait"], r["job"], f"{r['training']:.1f}" if r["training"] is not None else "-", r["pickup"],
            r["jobs"], r["version"]))
    print("(batch -: the first job, on all the labels, none embedded before; batch B: the labels trained first, then "
          "the job that B more labels trigger (TRAIN_EVERY=B); standby: the job ran in a process the runner had "
          "started ahead (JOB_STANDBY; in brackets, how long it had been ready when the job came), else in one "
          "started for it, which imports torch/transformers first. "
          "->queued: the triggering webhook to the job row; queue wait: to the runner taking it; job s: from then "
          "to the promotion (the 'current' file written); of which run: FineTuneJob.run's own seconds; ->/setup: "
          "from the promotion to /setup answering it, polled every 0.1 s)")
    pairs = {}
    for r in rows:
        pairs.setdefault((r["labels"], r["batch"]), {})[r["standby"]] = r["latency"]
    for (labels, batch), got in pairs.items():
        if True in got and False in got:
            print(f"{labels} labels{f' + a batch of {batch}' if batch else ''}: {got[True]:.1f} s with the process "
                  f"started ahead, {got[False]:.1f} s without: {got[False] / got[True]:.1f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=256, help="AG News dev rows for the throughput runs (CPU)")
    parser.add_argument("--gpu-rows", type=int, default=4096, help="rows for the CUDA runs")
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs per contender; the best is kept")
    parser.add_argument("--head-labels", type=int, default=500)
    parser.add_argument("--labels", default="50,200,1000", help="label counts for the loop latency")
    parser.add_argument("--batch", type=int, default=10,
                        help="also time the job a batch of this many more labels triggers (TRAIN_EVERY; 0: skip)")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-loop", action="store_true")
    args = parser.parse_args()
    if not (DATA / "agnews" / "dev.tsv").is_file():
        print(f"skipped: {DATA / 'agnews' / 'dev.tsv'} is absent (the real data lives in ../shared/data)")
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} torch threads, "
          f"{os.cpu_count()} cores, CUDA: {torch.cuda.get_device_name(0) if cuda else 'none'}; "
          "load average %.1f %.1f %.1f" % os.getloadavg())
    if not args.skip_throughput:
        rows = dev_rows(args.rows)
        print_throughput(throughput("cpu", rows, args.repeats), args.rows, args.repeats, 16)
        if cuda:
            rows = dev_rows(args.gpu_rows)
            print_throughput(throughput("cuda", rows, args.repeats, extra_batches=(256,)), args.gpu_rows,
                             args.repeats, 16)
        head_timing(args.head_labels)
    if not args.skip_loop:
        results = []
        with tempfile.TemporaryDirectory(prefix="bench-loop-") as tmp:
            for n in [int(x) for x in args.labels.split(",") if x.strip()]:
                for batch in ([0, args.batch] if args.batch else [0]):
                    if batch and n % batch:
                        raise SystemExit(f"--batch {batch} must divide every label count (got {n})")
                    for standby in (True, False):  # the baseline: a job process started for the job
                        results.append(loop_latency(n, Path(tmp), batch, standby))
                        print(f"  {n} labels{f' + {batch}' if batch else ''}, standby {standby}: "
                              f"{results[-1]['latency']:.1f} s", flush=True)
        print_latency(results, "CUDA" if cuda else "CPU")
    print("\nload average at the end: %.1f %.1f %.1f (other work on this machine slows every figure above)" % os.getloadavg())
    return 0


if __name__ == "__main__":
    sys.exit(main())
