"""Active learning on AG News: learning curves of random, uncertainty and diverse-uncertainty batches.

Usage::

    .venv/bin/python bench/active_learning.py [--pool 2000] [--test 1000] [--seeds 3] [--first-seed 0]
                                              [--batch 16] [--checkpoints 64,128,256,512]
                                              [--modes margin,entropy] [--self-train]
                                              [--full-every 64] [--strategies random,uncertainty,diverse,typical]
                                              [--out curves.json]
    .venv/bin/python bench/active_learning.py --merge a.json b.json ...   # curves of processes side by side, pooled

Simulated annotators: the pool is the first ``--pool`` texts of ``../shared/data/agnews/dev.tsv``
(embedded once, as the backend's refresh embeds a project's unlabeled tasks), the evaluation set
the first ``--test`` rows of ``test.tsv``.  Each run starts with nothing labeled and asks for
``--batch`` tasks at a time; an annotator answers with the gold label; the fast frozen-encoder
head (``ls_backend.trainer.fit_head``, what a ``TRAIN_MODE=frozen`` job fits, with the zero-shot
head as its prior) is refit after every batch; accuracy on the test rows is read at each
checkpoint.  The default batch of 16 is about the loop's own rhythm (a job every ``TRAIN_EVERY`` = 10
labels, ``/next`` batches of 20).  The batches are chosen

(a) ``random``: uniformly from the unlabeled pool;
(b) ``uncertainty``: the lowest scores under the default ``SCORE_MODE`` (confidence);
(c) ``diverse``: ``DiverseUncertainty`` (k-means over the 10 x batch most uncertain);
(d) ``typical``: ``TypicalCoverage`` (the most typical members of the largest clusters no label
    covers yet; no model needed);

and, as the backend's ``/next`` does, (b) and (c) take their first batch by coverage (k-means
representatives of the pool), since no trained version exists yet; (d) is its own cold start.  ``--modes`` adds uncertainty
runs under other score modes, and ``--strategies`` takes ``NAME:MODE`` for (b) or (c) under another
score mode (``diverse:margin``).  The same ``--seeds`` seeds for every strategy.

``--self-train`` refits the self-trained fast head between rounds instead (what the fast lane
also trains where a refresh has embedded the unlabeled tasks: here the pool's unlabeled rest);
``--first-seed`` moves the seeds, e.g. to check a strategy on seeds it was not chosen on.

``--full-every K`` fine-tunes the encoder every K labels (the full recipe, ``fine_tune``, warm-started
from the run's current encoder and head, on every label so far: what a full-lane job does), then
re-embeds the pool and the test rows with it; between fine-tunes the fast head is refit on the tuned
encoder's embeddings.  A checkpoint on a fine-tune reads the fine-tuned model itself.  Where the
encoder is fine-tuned every round, uncertainty is that of the fine-tuned model, as in the published
studies of active learning with BERT-style models.  Minutes per run on a GPU; hours on a small CPU.
``--strategies`` runs a subset (to spread runs over processes) and ``--out`` writes every curve as
JSON (after each curve, so a run stopped early keeps what it finished).

Area under the curve: the trapezoid over the checkpoints' label counts, divided by their span
(so it reads as an accuracy, in points).

This drives the backend's own parts in one process (the bundled encoder, ``fit_head``, the
strategy classes ``GET /projects/<key>/next`` uses) rather than the running backend over HTTP:
through Label Studio each round would add a training job and a refresh of 2,000 predictions, and
the 9 runs x 16 rounds would take hours on a small CPU without changing what is measured.

Embeddings are cached under ``$LS_BACKEND_CACHE/bench`` (default ``~/.cache/ls-backend/bench``).
Skips (exit 0) with a message when ../shared/data is absent.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "agnews"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ls_backend.model import ClassifierHead, Encoder, resolve_device  # noqa: E402
from ls_backend.sampling import (  # noqa: E402
    SCORE_MODES,
    CoverageSampling,
    DiverseUncertainty,
    RandomSampling,
    TypicalCoverage,
    UncertaintySampling,
)
from ls_backend.settings import Settings  # noqa: E402
from ls_backend.trainer import (  # noqa: E402
    ControlData,
    TrainingArguments,
    fine_tune,
    fit_head,
    self_train_head,
    split_for_validation,
)

LABELS = ["World", "Sports", "Business", "Sci/Tech"]


def read_rows(split: str, limit: int) -> list[tuple[str, str]]:
    rows = []
    with open(DATA / f"{split}.tsv", newline="", encoding="utf-8") as handle:
        for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
            rows.append((row[0], row[1]))
            if len(rows) == limit:
                break
    return rows


def embed(encoder: Encoder, texts: list[str], settings: Settings) -> np.ndarray:
    cache = Path(os.environ.get("LS_BACKEND_CACHE") or Path.home() / ".cache" / "ls-backend") / "bench"
    digest = hashlib.sha1("\x00".join([encoder.path, str(encoder.max_length), *texts]).encode()).hexdigest()[:16]
    path = cache / f"agnews-{len(texts)}-{digest}.npy"
    if path.exists():
        return np.load(path)
    started = time.perf_counter()
    vectors = encoder.encode(texts, settings.batch_size)
    print(f"  embedded {len(texts)} texts in {time.perf_counter() - started:.0f}s", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return vectors


def area(counts: list[int], accuracies: list[float]) -> float:
    """Trapezoid under the curve over the label counts, divided by their span: an accuracy."""
    x, y = np.asarray(counts, dtype=float), np.asarray(accuracies, dtype=float)
    return float(((y[1:] + y[:-1]) / 2 * np.diff(x)).sum() / (x[-1] - x[0]))


class Tuner:
    """The full recipe every ``every`` labels: the fine-tuned encoder re-embeds the pool and test rows."""

    def __init__(self, encoder: Encoder, pool_texts: list[str], test_texts: list[str], every: int, batch_size: int,
                 fields: dict | None = None):
        self.base, self.pool_texts, self.test_texts = encoder, pool_texts, test_texts
        self.fields = fields or {}
        self.every, self.batch_size = every, batch_size
        self.encoder = encoder
        self.seconds = 0.0

    def reset(self) -> None:
        self.encoder = self.base

    def tune(self, data: ControlData, head: ClassifierHead, seed: int) -> tuple[ClassifierHead, np.ndarray, np.ndarray]:
        started = time.perf_counter()
        args = TrainingArguments(**{"seed": seed, "max_length": self.encoder.max_length, **self.fields})
        fit, valid = split_for_validation(data, 0.15, seed)  # as a job: never the test rows
        self.encoder, heads, _ = fine_tune(self.encoder, {data.name: head}, [fit], args, validation=[valid])
        pool = self.encoder.encode(self.pool_texts, self.batch_size)
        test = self.encoder.encode(self.test_texts, self.batch_size)
        self.seconds += time.perf_counter() - started
        return heads[data.name], pool, test


def run(strategy: str, mode: str, seed: int, pool: np.ndarray, gold: np.ndarray, texts: list[str],
        test: np.ndarray, test_gold: np.ndarray, prior: ClassifierHead, batch: int, checkpoints: list[int],
        self_train: bool = False, tuner: Tuner | None = None) -> list[float]:
    rng = np.random.default_rng(seed)
    if tuner is not None:
        tuner.reset()
    labeled: list[int] = []
    accuracies: list[float] = []
    head = prior
    chooser = {
        "random": RandomSampling(),
        "uncertainty": UncertaintySampling(mode),
        "diverse": DiverseUncertainty(mode),
        "typical": None,  # made each round: it reads the labeled tasks' embeddings
    }[strategy]
    while len(labeled) < checkpoints[-1]:
        unlabeled = np.setdiff1d(np.arange(len(pool)), labeled)
        if strategy == "typical":
            picked = TypicalCoverage(labeled=pool[labeled]).query(None, pool[unlabeled], batch, rng)
        elif strategy != "random" and not labeled:
            picked = CoverageSampling().query(None, pool[unlabeled], batch, rng)  # the cold start
        else:
            probabilities = head.probabilities(pool[unlabeled]) if chooser.needs_model else None
            picked = chooser.query(probabilities, pool[unlabeled], batch, rng)
        labeled += [int(unlabeled[i]) for i in picked]  # the annotator answers with the gold label
        data = ControlData("topic", LABELS, False, [texts[i] for i in labeled], [(LABELS[gold[i]],) for i in labeled])
        if tuner is not None and len(labeled) % tuner.every == 0:
            head, pool, test = tuner.tune(data, head, seed)
            prior = head  # the fast head between fine-tunes starts from the tuned model's head
            if len(labeled) in checkpoints:
                accuracies.append(float((head.probabilities(test).argmax(axis=1) == test_gold).mean()))
                print(f"    {strategy} seed {seed}: {len(labeled)} labels, {100 * accuracies[-1]:.1f}", flush=True)
            continue
        head, _ = fit_head(pool[labeled], data, prior, seed)
        if self_train:  # the fast lane's self-trained candidate, on the pool's unlabeled rest
            rest = np.setdiff1d(np.arange(len(pool)), labeled)
            head, _ = self_train_head(pool[labeled], data, pool[rest], head, prior, TrainingArguments(seed=seed))
        if len(labeled) in checkpoints:
            accuracies.append(float((head.probabilities(test).argmax(axis=1) == test_gold).mean()))
    return accuracies


def merge(paths: list[str]) -> int:
    """The curves of several ``--out`` files (processes side by side), pooled per strategy and
    ``--full-every``: the mean curve, area and the area ahead of random's on the same seeds."""
    pooled: dict[tuple[int, str], dict[int, list[float]]] = {}
    checkpoints: dict[int, list[int]] = {}
    for path in paths:
        got = json.loads(Path(path).read_text())
        every = int(got["full_every"])
        if checkpoints.setdefault(every, got["checkpoints"]) != got["checkpoints"]:
            raise SystemExit(f"{path}: other checkpoints than the files before it")
        for name, curves in got["curves"].items():
            for seed, curve in zip(got["seeds"], curves):
                pooled.setdefault((every, name), {})[int(seed)] = curve
    for every in sorted(checkpoints):
        marks = checkpoints[every]
        base = pooled.get((every, "random"), {})
        print(f"\nfine-tuned every {every} labels" if every else "\nfast head only")
        print("strategy".ljust(18) + "".join(f"{c:>8}" for c in marks) + "    area  seeds   vs random (same seeds; ahead on)")
        for (e, name), by_seed in sorted(pooled.items()):
            if e != every:
                continue
            seeds = sorted(by_seed)
            curves = np.asarray([by_seed[s] for s in seeds])
            areas = {s: area(marks, by_seed[s]) for s in seeds}
            line = name.ljust(18) + "".join(f"{m:8.1f}" for m in curves.mean(axis=0))
            line += f"  {np.mean(list(areas.values())):6.2f}  {len(seeds):>5}"
            common = [s for s in seeds if s in base]
            if name != "random" and common:
                ahead = [areas[s] - area(marks, base[s]) for s in common]
                line += f"   {np.mean(ahead):+.2f} ({sum(a > 0 for a in ahead)} of {len(common)})"
            print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pool", type=int, default=2000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds --first-seed .. --first-seed + --seeds - 1")
    parser.add_argument("--self-train", action="store_true",
                        help="the head between rounds is the self-trained fast head (pseudo-labels on the unlabeled pool)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--checkpoints", default="64,128,256,512")
    parser.add_argument("--modes", default="", help="extra uncertainty runs under these score modes (margin,entropy)")
    parser.add_argument("--full-every", type=int, default=0, metavar="K",
                        help="fine-tune the encoder every K labels (the full recipe; 0: the fast head only)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="with --full-every: override a TrainingArguments field of the fine-tunes (repeatable)")
    parser.add_argument("--strategies", default="random,uncertainty,diverse,typical",
                        help="which of the four to run, each as NAME or NAME:SCORE_MODE (e.g. diverse:margin)")
    parser.add_argument("--out", help="also write every curve here (JSON)")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="only pool the curves of these --out files (per strategy and --full-every) and print them")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge)
    if not DATA.is_dir():
        print(f"skipped: {DATA} is not here (it lives in ../shared/data beside the repository)")
        return 0
    checkpoints = [int(c) for c in args.checkpoints.split(",")]
    if any(c % args.batch for c in checkpoints):
        parser.error("every checkpoint must be a multiple of --batch")
    if args.full_every and (args.full_every % args.batch or any(c % args.full_every for c in checkpoints)):
        parser.error("--full-every must be a multiple of --batch, and every checkpoint a multiple of it")

    settings = Settings.from_env()
    encoder = Encoder(settings.encoder_path, resolve_device(settings.device), 128)
    pool_rows, test_rows = read_rows("dev", args.pool), read_rows("test", args.test)
    print(f"AG News: pool {len(pool_rows)} dev texts, evaluation {len(test_rows)} test rows; device "
          f"{encoder.device}; batch {args.batch}; seeds {args.first_seed}-{args.first_seed + args.seeds - 1}; "
          f"head: {'self-trained fast head' if args.self_train else 'fast head'}"
          + (f"; encoder fine-tuned every {args.full_every} labels" if args.full_every else ""), flush=True)
    texts = [t for t, _ in pool_rows]
    pool = embed(encoder, texts, settings)
    test = embed(encoder, [t for t, _ in test_rows], settings)
    gold = np.array([LABELS.index(label) for _, label in pool_rows])
    test_gold = np.array([LABELS.index(label) for _, label in test_rows])
    rows = encoder.encode(LABELS)
    prior = ClassifierHead(LABELS, rows, np.zeros(len(LABELS), dtype=np.float32), temperature=settings.zero_shot_temperature)
    zero_shot = float((prior.probabilities(test).argmax(axis=1) == test_gold).mean())
    print(f"zero-shot accuracy (no labels): {100 * zero_shot:.1f}", flush=True)

    tuner = None
    if args.full_every:
        from label_efficiency import overrides  # bench/: NAME=VALUE pairs as TrainingArguments fields

        tuner = Tuner(encoder, texts, [t for t, _ in test_rows], args.full_every, settings.batch_size, overrides(args.set))
    runs = []  # (strategy, score mode)
    for entry in (e.strip() for e in args.strategies.split(",")):
        name, _, mode = entry.partition(":")
        if name not in ("random", "uncertainty", "diverse", "typical") or mode not in ("", *SCORE_MODES):
            parser.error(f"--strategies: unknown {entry!r}")
        if (name, mode or "confidence") not in runs:
            runs.append((name, mode or "confidence"))
    runs += [("uncertainty", mode.strip()) for mode in args.modes.split(",")
             if mode.strip() and ("uncertainty", mode.strip()) not in runs]
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    curves: dict[str, list[list[float]]] = {}
    for strategy, mode in runs:
        name = strategy if mode == "confidence" else f"{strategy}:{mode}"
        started = time.perf_counter()
        for seed in seeds:
            curve = run(strategy, mode, seed, pool, gold, texts, test, test_gold, prior, args.batch, checkpoints,
                        args.self_train, tuner)
            curves.setdefault(name, []).append([100 * a for a in curve])
            if args.out:  # after every curve: a run stopped early keeps the curves it finished
                Path(args.out).write_text(json.dumps({
                    "checkpoints": checkpoints, "seeds": seeds, "batch": args.batch,
                    "full_every": args.full_every, "self_train": args.self_train, "device": str(encoder.device),
                    "curves": curves,
                }, indent=1))
        print(f"  {name}: {time.perf_counter() - started:.0f}s"
              + (f" ({tuner.seconds:.0f}s fine-tuning so far)" if tuner else ""), flush=True)
    results = {name: np.asarray(c) for name, c in curves.items()}

    header = "strategy".ljust(22) + "".join(f"{c:>12}" for c in checkpoints) + "      area   vs random"
    print("\naccuracy (%) after N labels, mean over seeds (min-max)\n" + header)
    base = np.mean([area(checkpoints, curve) for curve in results["random"]]) if "random" in results else float("nan")
    for name, curves in results.items():
        areas = [area(checkpoints, curve) for curve in curves]
        cells = "".join(f"{m:12.1f}" for m in curves.mean(axis=0))
        print(f"{name.ljust(22)}{cells}  {np.mean(areas):8.2f}  {np.mean(areas) - base:+9.2f}")
        spread = "".join(f"{lo:.1f}-{hi:.1f}".rjust(12) for lo, hi in zip(curves.min(axis=0), curves.max(axis=0)))
        print(" " * 22 + spread + f"  per seed: {', '.join(f'{a:.2f}' for a in areas)}")
    if not {"random", "uncertainty", "diverse"} <= results.keys():
        return 0
    best = max(np.mean([area(checkpoints, c) for c in results[n]]) for n in ("uncertainty", "diverse"))
    print(f"\ntarget: (b) or (c) ahead of (a) by >= 2.00 points of area: {best - base:+.2f} "
          f"({'met' if best - base >= 2 else 'not met'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
