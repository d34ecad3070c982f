"""Label efficiency: accuracy after N labels for our recipes beside transformers.Trainer defaults.

Runs the project's own training code (``fit_head`` = the fast head, ``fine_tune`` = the full
recipe, ``auto`` = what a job promotes: the better of the two on a split of the training
labels) and, as the baseline, ``transformers.Trainer`` with default arguments (3 epochs,
lr 5e-5, batch 8) on ``AutoModelForSequenceClassification`` from the same bundled encoder —
what Label Studio's example backends do — all in one run, on the same labels.

    .venv/bin/python bench/label_efficiency.py --dataset agnews --sizes 16 64 256 --seeds 1 --test 1000
    .venv/bin/python bench/label_efficiency.py --dataset sst2 --sizes 64 256 --no-trainer
    .venv/bin/python bench/label_efficiency.py --sizes 64 --seeds 3 --contrastive 2560   # + the contrastive candidate

Full fine-tuning costs minutes per size on a 2-core CPU; use --no-full / --no-trainer to
bound the run, or run it where a GPU is lent.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ls_backend.model import Encoder, resolve_device  # noqa: E402
from ls_backend.settings import bundled_encoder_path  # noqa: E402
from ls_backend.trainer import (  # noqa: E402
    ControlData,
    TrainingArguments,
    contrastive_tune,
    fine_tune,
    fit_head,
    split_for_validation,
)
from tests.support.data import AGNEWS_LABELS, DATA, agnews, sst2  # noqa: E402


def load(dataset: str, test_size: int):
    if dataset == "agnews":
        pool = agnews("dev")
        test = agnews("test", test_size)
        return AGNEWS_LABELS, pool, test
    names = ["Negative", "Positive"]
    pool = [(t, names[y]) for t, y in sst2("train", 20000, min_words=6)]
    test = [(t, names[y]) for t, y in sst2("test", test_size)]
    return names, pool, test


def sample(pool, labels, n, seed):
    """n labels drawn at random, at least one per class."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pool))
    picked, seen = [], set()
    for i in order:  # one of each class first
        if pool[i][1] not in seen:
            seen.add(pool[i][1])
            picked.append(i)
        if len(seen) == len(labels):
            break
    for i in order:
        if len(picked) >= n:
            break
        if i not in picked:
            picked.append(i)
    return [pool[i] for i in picked[:n]]


def zero_shot_head(encoder, labels):
    from ls_backend.labeling import ControlSpec, LabelSpec
    from ls_backend.model import zero_shot_head as build

    control = ControlSpec("c", "choices", "t", "text", tuple(LabelSpec(v, v) for v in labels))
    return build(control, encoder, "{label}", 0.05, 0.5)


def accuracy(head, embeddings, gold, labels):
    predicted = head.probabilities(embeddings).argmax(axis=1)
    return float(np.mean([labels[p] == g for p, g in zip(predicted, gold)]))


def trainer_baseline(rows, test, labels, path, seed):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments as HFArgs

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(labels))
    index = {label: i for i, label in enumerate(labels)}

    class Rows(torch.utils.data.Dataset):
        def __init__(self, items):
            self.enc = tokenizer([t for t, _ in items], truncation=True, max_length=128)
            self.y = [index[label] for _, label in items]

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return {"input_ids": self.enc["input_ids"][i], "attention_mask": self.enc["attention_mask"][i], "labels": self.y[i]}

    import tempfile

    with tempfile.TemporaryDirectory() as out:
        args = HFArgs(output_dir=out, report_to="none", seed=seed, save_strategy="no", logging_strategy="no", disable_tqdm=True)
        from transformers import DataCollatorWithPadding

        trainer = Trainer(model=model, args=args, train_dataset=Rows(rows), data_collator=DataCollatorWithPadding(tokenizer))
        trainer.train()
        predicted = trainer.predict(Rows(test)).predictions.argmax(axis=1)
    return float(np.mean([labels[p] == g for p, (_, g) in zip(predicted, test)]))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", choices=["agnews", "sst2"], default="agnews")
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--no-full", action="store_true", help="skip our full fine-tuning")
    parser.add_argument("--no-trainer", action="store_true", help="skip the transformers.Trainer baseline")
    parser.add_argument("--contrastive", type=int, default=0, metavar="PAIRS",
                        help="also the contrastive candidate with this many pairs (0: skip; the jobs use 2560)")
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()
    if not DATA.exists():
        print(f"skipped: {DATA} (../shared/data) is not here")
        return 0
    path = bundled_encoder_path()
    device = resolve_device("auto")
    encoder = Encoder(path, device, args.max_length)
    labels, pool, test = load(args.dataset, args.test)
    test_gold = [g for _, g in test]
    started = time.perf_counter()
    test_emb = encoder.encode([t for t, _ in test])
    print(f"{args.dataset}: pool {len(pool)}, test {len(test)}, device {device}; test embedded in {time.perf_counter() - started:.0f}s")
    zero = accuracy(zero_shot_head(encoder, labels), test_emb, test_gold, labels)
    print(f"zero-shot (cold start): {zero:.3f}")
    header = (f"{'labels':>6} {'seed':>4} {'fast head':>9} {'full':>6} {'auto':>6} {'Trainer':>8} {'contrast':>8} "
              f"{'fast s':>7} {'full s':>7} {'Trainer s':>9} {'contr s':>7}")
    print(header)
    table = {}
    for n in args.sizes:
        for seed in range(args.seeds):
            rows = sample(pool, labels, n, seed)
            data = ControlData("c", labels, False, [t for t, _ in rows], [(g,) for _, g in rows])
            t0 = time.perf_counter()
            prior = zero_shot_head(encoder, labels)
            head, _ = fit_head(encoder.encode(data.texts), data, prior, seed)
            fast_s = time.perf_counter() - t0
            fast = accuracy(head, test_emb, test_gold, labels)
            full = auto = None
            full_s = 0.0
            if not args.no_full:
                t0 = time.perf_counter()
                fit, valid = split_for_validation(data, 0.15, seed)
                fit_emb = encoder.encode(fit.texts)
                start_head, _ = fit_head(fit_emb, fit, prior, seed)
                student, heads, _ = fine_tune(
                    encoder, {"c": start_head}, [fit], TrainingArguments(seed=seed, max_length=args.max_length), validation=[valid]
                )
                full_s = time.perf_counter() - t0
                full = accuracy(heads["c"], student.encode([t for t, _ in test]), test_gold, labels)
                # auto: the candidate that wins on the training labels' own split (never the test set)
                if valid is not None:
                    fast_valid = accuracy(start_head, encoder.encode(valid.texts), [g[0] for g in valid.targets], labels)
                    full_valid = accuracy(heads["c"], student.encode(valid.texts), [g[0] for g in valid.targets], labels)
                    auto = full if full_valid > fast_valid else fast
                else:
                    auto = fast
            baseline, trainer_s = None, 0.0
            if not args.no_trainer:
                t0 = time.perf_counter()
                baseline = trainer_baseline(rows, test, labels, path, seed)
                trainer_s = time.perf_counter() - t0
            contrast, contrast_s = None, 0.0
            if args.contrastive:
                t0 = time.perf_counter()
                tuned, _ = contrastive_tune(
                    encoder, [data], TrainingArguments(seed=seed, max_length=args.max_length, contrastive_pairs=args.contrastive)
                )
                tuned_head, _ = fit_head(tuned.encode(data.texts), data, zero_shot_head(tuned, labels), seed)
                contrast_s = time.perf_counter() - t0
                contrast = accuracy(tuned_head, tuned.encode([t for t, _ in test]), test_gold, labels)
            table[(n, seed)] = (fast, full, auto, baseline, contrast)

            def cell(x):
                return f"{x:.3f}" if x is not None else "-"

            print(
                f"{n:>6} {seed:>4} {cell(fast):>9} {cell(full):>6} {cell(auto):>6} {cell(baseline):>8} {cell(contrast):>8} "
                f"{fast_s:>7.1f} {full_s:>7.1f} {trainer_s:>9.1f} {contrast_s:>7.1f}",
                flush=True,
            )
    print("means over seeds (fast / full / auto / Trainer defaults / contrastive):")
    for n in args.sizes:
        values = [table[(n, s)] for s in range(args.seeds)]
        means = []
        for column in range(5):
            got = [v[column] for v in values if v[column] is not None]
            means.append(f"{np.mean(got):.3f}" if got else "-")
        print(f"  {n:>6} labels: " + " / ".join(means) + f"   (zero-shot {zero:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
