"""Label efficiency: accuracy after N labels for our recipes beside transformers.Trainer defaults.

Runs the project's own training code on the same N labels: ``fast head`` (``fit_head`` on
frozen embeddings), ``self-train`` (the fast head refit with its surest guesses on the project's
unlabeled tasks, ``self_train_head``; here ``--unlabeled`` texts of the pool stand for the tasks a
refresh of predictions embeds), ``full`` (``fine_tune``, warm-started from the self-trained head,
on the labels plus the texts of its ``--pseudo`` surest guesses, as a job does where the
refresh's pool kept texts; ``--pseudo 0``: labels only), with ``--full-rounds 2`` ``full-2`` (the
second round) and ``soup`` (the two rounds' weight average), optionally ``contrastive``; and
``auto``, what a job promotes: every candidate a job would train (full from 50 labels on a
CPU), trained outside the evaluation slice (20% of the labels, by task id as in a job; nor does
it guess the unlabeled tasks of the slice) and the best on the slice served (figures within one example of the slice count as ties, and ties go as
in a job: ``ls_backend.finetune.choose_candidate``).  The baseline is
``transformers.Trainer`` with default arguments (3 epochs, lr 5e-5, batch 8) on
``AutoModelForSequenceClassification`` from the same bundled encoder — what Label Studio's
example backends do — in the same run, on the same labels.

    .venv/bin/python bench/label_efficiency.py --dataset agnews --sizes 16 64 256 --seeds 1 --test 1000
    .venv/bin/python bench/label_efficiency.py --dataset sst2 --sizes 64 256 --no-trainer
    .venv/bin/python bench/label_efficiency.py --sizes 64 --seeds 3 --contrastive 2560   # + the contrastive candidate
    .venv/bin/python bench/label_efficiency.py --sizes 64 --no-auto --no-trainer --set learning_rate=2e-4 --set target_examples=4096
    .venv/bin/python bench/label_efficiency.py --sizes 64 256 --seeds 3 --no-trainer --auto-only   # what a job serves only
    .venv/bin/python bench/label_efficiency.py --sizes 64 --no-trainer --auto-only --job-detail  # + each candidate of the job

``--set NAME=VALUE`` overrides a field of ``ls_backend.trainer.TrainingArguments`` (what the job's
settings set) for every candidate, to compare recipes in one run.

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

from ls_backend.finetune import (  # noqa: E402
    choose_candidate,
    in_eval_slice,
    learned_from_pool,
    second_round_wanted,
    training_arguments,
    slice_tolerance,
    tie_preference,
)
from ls_backend.model import Encoder, resolve_device  # noqa: E402
from ls_backend.settings import Settings, bundled_encoder_path  # noqa: E402
from ls_backend.trainer import (  # noqa: E402
    ControlData,
    TrainingArguments,
    average_students,
    contrastive_tune,
    fine_tune,
    fit_head,
    self_train_head,
    split_for_validation,
    with_pseudo_labels,
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
    """Indices of n pool rows drawn at random, at least one per class."""
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
    return [int(i) for i in picked[:n]]


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
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments as HFArgs, set_seed

    tokenizer = AutoTokenizer.from_pretrained(path)
    set_seed(seed)  # the new classifier layer's initial weights: the same whatever ran before
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


def overrides(pairs: list[str]) -> dict:
    """``NAME=VALUE`` pairs as TrainingArguments fields, each value of its field's type."""
    defaults = TrainingArguments()
    out = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if not hasattr(defaults, name) or not value:
            raise SystemExit(f"--set {pair}: expected NAME=VALUE with NAME a TrainingArguments field")
        out[name] = type(getattr(defaults, name))(float(value) if isinstance(getattr(defaults, name), int) else value)
    return out


def training_args(args, seed, **extra) -> TrainingArguments:
    fields = {"seed": seed, "max_length": args.max_length, "self_train_tune_max": args.pseudo, **extra}
    return TrainingArguments(**{**fields, **args.overrides})


def train_candidates(encoder, data, prior, unlabeled, args, seed, full: bool, full_rounds: int = 1):
    """Every recipe a job may train, on ``data``: {name: (encoder to read with, head, seconds)}.
    ``unlabeled``: (embeddings, texts) of the project's unlabeled tasks, or None; ``full_rounds``:
    of the full recipe with them."""
    out = {}
    t0 = time.perf_counter()
    embeddings = encoder.encode(data.texts)
    fast, _ = fit_head(embeddings, data, prior, seed)
    out["fast head"] = (encoder, fast, time.perf_counter() - t0)
    warm = fast
    if unlabeled is not None:
        t0 = time.perf_counter()
        warm, _ = self_train_head(embeddings, data, unlabeled[0], fast, prior, training_args(args, seed))
        out["self-train"] = (encoder, warm, time.perf_counter() - t0 + out["fast head"][2])
    if full:
        t0 = time.perf_counter()
        fit, valid = split_for_validation(data, 0.15, seed)  # early stopping: never the slice or the test rows
        tuning = training_args(args, seed)
        labels_only = fit
        if unlabeled is not None:  # as a job: the self-trained head's surest guesses join the labels
            fit, _ = with_pseudo_labels(fit, warm, unlabeled[0], unlabeled[1], tuning)
        student, heads, _ = fine_tune(encoder, {"c": warm}, [fit], tuning, validation=[valid])
        out["full"] = (student, heads["c"], time.perf_counter() - t0)
        if unlabeled is not None and full_rounds >= 2:  # as a job's second round: the tuned model teaches
            t0 = time.perf_counter()
            rounds = training_args(args, seed, self_train_tune_share=tuning.second_round_share,
                                   self_train_tune_max=tuning.second_round_max)
            taught, _ = with_pseudo_labels(labels_only, heads["c"], student.encode(unlabeled[1]), unlabeled[1], rounds)
            second, second_heads, _ = fine_tune(encoder, {"c": warm}, [taught], tuning, validation=[valid])
            out["full-2"] = (second, second_heads["c"], time.perf_counter() - t0 + out["full"][2])
            t0 = time.perf_counter()  # as a job: the two rounds' weight average
            soup, soup_heads = average_students(student, second, heads, second_heads, [valid])
            out["soup"] = (soup, soup_heads["c"], time.perf_counter() - t0 + out["full-2"][2])
    if args.contrastive:
        t0 = time.perf_counter()
        tuned, _ = contrastive_tune(
            encoder, [data], training_args(args, seed, contrastive_pairs=args.contrastive)
        )
        tuned_head, _ = fit_head(tuned.encode(data.texts), data, zero_shot_head(tuned, data.labels), seed)
        out["contrastive"] = (tuned, tuned_head, time.perf_counter() - t0)
    return out


EVAL_SHARE = Settings().eval_share  # the job's evaluation slice (20%)
# the job's names for the bench's columns (ls_backend.finetune.tie_preference ranks ties on the slice)
JOB_NAMES = {"fast head": "frozen"}
COLUMNS = ["fast head", "self-train", "full", "full-2", "soup", "contrastive"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", choices=["agnews", "sst2"], default="agnews")
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds --first-seed .. --first-seed + --seeds - 1")
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--unlabeled", type=int, default=4000,
                        help="the project's unlabeled tasks, for self-training: this many pool texts (0: none)")
    parser.add_argument("--no-full", action="store_true", help="skip our full fine-tuning")
    parser.add_argument("--pseudo", type=int, default=TrainingArguments().self_train_tune_max,
                        help="the full recipe's pseudo-labelled texts (SELF_TRAIN_TUNE_MAX; 0: labels only)")
    parser.add_argument("--full-rounds", type=int, choices=[1, 2], default=None,
                        help="rounds of the full recipe with the pool (SELF_TRAIN_TUNE_ROUNDS; 2: also the second "
                             "round; default: as a job, 2 on CUDA, and on a CPU 2 up to 512 labels, else 1)")
    parser.add_argument("--no-auto", action="store_true", help="skip the job's own choice (trains every candidate twice)")
    parser.add_argument("--no-trainer", action="store_true", help="skip the transformers.Trainer baseline")
    parser.add_argument("--auto-only", action="store_true",
                        help="only what a job promotes: skip the recipes trained on all N labels (half the time)")
    parser.add_argument("--job-detail", action="store_true",
                        help="with auto: also each candidate of the job, its figure on the slice and on the test rows")
    parser.add_argument("--contrastive", type=int, default=0, metavar="PAIRS",
                        help="also the contrastive candidate with this many pairs (0: skip; the jobs use 2560 on CUDA)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="override a TrainingArguments field for every candidate (repeatable)")
    args = parser.parse_args()
    args.overrides = overrides(args.set)
    job_defaults = training_arguments(Settings())  # SELF_TRAIN_TUNE_ROUNDS unset: as a job on this device

    def rounds_for(n: int) -> int:
        return args.full_rounds or (2 if second_round_wanted(job_defaults, n) else 1)
    if args.overrides:
        print("TrainingArguments overrides: " + ", ".join(f"{k}={v}" for k, v in args.overrides.items()))
    if not DATA.exists():
        print(f"skipped: {DATA} (../shared/data) is not here")
        return 0
    path = bundled_encoder_path()
    device = resolve_device("auto")
    encoder = Encoder(path, device, args.max_length)
    labels, pool, test = load(args.dataset, args.test)
    test_texts = [t for t, _ in test]
    test_gold = [g for _, g in test]
    started = time.perf_counter()
    test_emb = encoder.encode(test_texts)
    # the project's unlabeled tasks: a fixed sample of the pool; each run leaves out its own labels
    unlabeled_rows = np.sort(np.random.default_rng(123).permutation(len(pool))[: args.unlabeled])
    unlabeled_emb = encoder.encode([pool[i][0] for i in unlabeled_rows]) if args.unlabeled else None
    # the rows a job leaves unguessed: its evaluation slice (pool rows stand for task ids)
    in_slice = np.array([in_eval_slice(int(i), EVAL_SHARE) for i in unlabeled_rows], dtype=bool)
    print(f"{args.dataset}: pool {len(pool)}, test {len(test)}, unlabeled {len(unlabeled_rows)}, device {device}; "
          f"embedded in {time.perf_counter() - started:.0f}s")
    zero = accuracy(zero_shot_head(encoder, labels), test_emb, test_gold, labels)
    print(f"zero-shot (cold start): {zero:.3f}")

    def test_accuracy(model):
        reader, head, _ = model
        return accuracy(head, test_emb if reader is encoder else reader.encode(test_texts), test_gold, labels)

    print(f"{'labels':>6} {'seed':>4} " + " ".join(f"{c:>11}" for c in COLUMNS)
          + f" {'auto':>6} {'(recipe)':<12} {'Trainer':>8}   seconds: " + " / ".join(COLUMNS) + " / Trainer")
    table = {}
    for n in args.sizes:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            picked = sample(pool, labels, n, seed)
            rows = [pool[i] for i in picked]
            unlabeled = job_unlabeled = None
            if unlabeled_emb is not None:
                left = ~np.isin(unlabeled_rows, picked)
                unlabeled = (unlabeled_emb[left], [pool[i][0] for i in unlabeled_rows[left]])
                outside = left & ~in_slice  # a job guesses no task of its evaluation slice
                job_unlabeled = (unlabeled_emb[outside], [pool[i][0] for i in unlabeled_rows[outside]])

            def as_data(items):
                return ControlData("c", labels, False, [t for t, _ in items], [(g,) for _, g in items])

            prior = zero_shot_head(encoder, labels)
            models = {} if args.auto_only else train_candidates(encoder, as_data(rows), prior, unlabeled, args, seed,
                                                                 not args.no_full, rounds_for(n))
            figures = {name: test_accuracy(model) for name, model in models.items()}
            seconds = {name: model[2] for name, model in models.items()}
            auto, recipe = None, "-"
            if not args.no_auto:
                # what a job promotes: candidates trained outside the slice, the best on the slice
                held = [i for i in picked if in_eval_slice(int(i), EVAL_SHARE)]
                train = [pool[i] for i in picked if i not in held]
                job_args = training_args(args, seed)
                wants_full = not args.no_full and (len(picked) >= job_args.full_min_labels or device.type == "cuda")
                job = train_candidates(encoder, as_data(train), prior, job_unlabeled, args, seed, wants_full,
                                       rounds_for(n))
                held_texts, held_gold = [pool[i][0] for i in held], [pool[i][1] for i in held]

                def on_slice(name):
                    reader, head, _ = job[name]
                    return accuracy(head, reader.encode(held_texts), held_gold, labels) if held else 0.0

                # the full recipe learned from the pool's guesses where there were unlabeled tasks
                from_pool = learned_from_pool(args.pseudo if job_unlabeled is not None else 0, len(picked), job_args)
                recipe = choose_candidate(
                    {name: on_slice(name) for name in job},
                    lambda name: tie_preference(JOB_NAMES.get(name, name), name == "full" and from_pool),
                    slice_tolerance(Settings(), len(held)),
                )
                auto = test_accuracy(job[recipe])
                if args.job_detail:  # what the slice saw beside what the test rows say, per candidate
                    print(f"  job, {n} labels, seed {seed}, slice of {len(held)}: " + "; ".join(
                        f"{name} {on_slice(name):.3f} / {test_accuracy(job[name]):.3f}" for name in job
                    ) + f" (slice / test; served {recipe})", flush=True)
            baseline, trainer_s = None, 0.0
            if not args.no_trainer:
                t0 = time.perf_counter()
                baseline = trainer_baseline(rows, test, labels, path, seed)
                trainer_s = time.perf_counter() - t0
            table[(n, seed)] = [figures.get(c) for c in COLUMNS] + [auto, baseline]

            def cell(x, width):
                return (f"{x:.3f}" if x is not None else "-").rjust(width)

            print(f"{n:>6} {seed:>4} " + " ".join(cell(figures.get(c), 11) for c in COLUMNS)
                  + f" {cell(auto, 6)} {recipe:<12} {cell(baseline, 8)}   "
                  + " / ".join(f"{seconds[c]:.1f}" if c in seconds else "-" for c in COLUMNS) + f" / {trainer_s:.1f}",
                  flush=True)
    print("means over seeds (" + " / ".join(COLUMNS) + " / auto / Trainer defaults):")
    for n in args.sizes:
        values = [table[(n, s)] for s in range(args.first_seed, args.first_seed + args.seeds)]
        means = []
        for column in range(len(COLUMNS) + 2):
            got = [v[column] for v in values if v[column] is not None]
            means.append(f"{np.mean(got):.3f}" if got else "-")
        print(f"  {n:>6} labels: " + " / ".join(means) + f"   (zero-shot {zero:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
