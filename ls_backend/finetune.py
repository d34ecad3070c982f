"""One fine-tuning job for one project: store -> trainer -> evaluation -> registry.

``fine_tune_project`` is what the queue runs (rq worker or embedded job runner).  It
warm-starts from the project's current version, trains the candidates that make
sense for the project's size, measures each candidate and the current model on the
project's frozen evaluation slice, writes every candidate it keeps as a version,
and promotes the best one only when it is not worse than the current one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from .labeling import CHOICES, LabelingPlan, UnsupportedConfig, plan_for
from .model import ClassifierHead, Encoder, reads_nothing, resolve_device, zero_shot_head
from .ner_job import encoder_is_taken, token_candidates, token_data, version_figures
from .registry import LoadedHeads, ModelRegistry, built_on_other_base
from .sampling import PoolStore, skipped_task_ids
from .settings import Settings
from .embeddings import EmbeddingCache, encoder_id, weights_stamp
from .trainer import (
    ControlData,
    TrainingArguments,
    average_students,
    contrastive_tune,
    evaluate,
    fine_tune,
    fit_head,
    save_encoder,
    self_train_head,
    set_seed,
    split_for_validation,
    with_pseudo_labels,
)

log = logging.getLogger(__name__)

Progress = Callable[[dict], None]


class NothingToTrain(Exception):
    """The job found no usable labels; it ends without a new version (``cutoff_seq``: the store's
    sequence its labels were read up to)."""

    cutoff_seq: int | None = None


# recipes that only refit heads on frozen embeddings (the fast lane's)
FAST_RECIPES = ("frozen", "self-train")
# on equal figures on the slice (bench/label_efficiency.py, AG News and SST-2 at 64 and 256 labels, means
# of 3 seeds): the full recipe where it also learned from the pool's guesses (ahead of every other
# candidate there), self-training (ahead of the plain fast head at every size), the plain fast head;
# then the other recipes that change the encoder (a new encoder to load and cached embeddings to redo,
# for a gain the slice did not show)
TIE_PREFERENCE = {"full-2": 5, "soup": 4, "full+pool": 3, "self-train": 2, "frozen": 1}
# the candidates that fine-tune the encoder
ENCODER_RECIPES = ("full", "full-2", "soup", "contrastive")
SELF_TRAIN_MIN_POOL = 50  # fewer unlabeled tasks than this: no self-training


def tie_preference(name: str, learned_from_pool: bool = False) -> int:
    """Where candidate ``name`` stands on equal figures on the slice; ``learned_from_pool``: the full
    recipe also trained on guesses for the project's unlabeled tasks."""
    return TIE_PREFERENCE.get("full+pool" if name == "full" and learned_from_pool else name, 0)


def slice_tolerance(settings: Settings, size: int) -> float:
    """How far apart two figures on a slice of ``size`` labels may be and still count as
    equal: ``PROMOTION_TOLERANCE`` or one example of the slice, whichever is larger."""
    return max(settings.promotion_tolerance, 1.0 / size) if size else 1.0


def slice_size(held_sizes) -> int:
    """The evaluation slice a job's decision rests on: the smallest among the controls that have
    one (a control whose labels all fell outside the slice, e.g. one added last week, is not
    measured, and must not turn the gate off for the others)."""
    return min((n for n in held_sizes if n), default=0)


def control_figure(figures: dict, name: str, control: str) -> float | None:
    """Candidate ``name``'s primary figure on ``control``'s slice (None: not measured there)."""
    return ((figures.get(name) or {}).get("controls") or {}).get(control, {}).get("primary")


def gate_failure(figures: dict, name: str, gated_sizes: dict[str, int], settings: Settings) -> str | None:
    """Why candidate ``name`` does not pass the gate, or None when it does: it must not be worse
    than the current model (``figures["current"]``) on any control whose slice holds ``EVAL_MIN``
    labels (``gated_sizes``: control -> slice labels), each by that control's own tolerance (one
    example of its slice, or ``PROMOTION_TOLERANCE``).  Judged on the mean over controls, a large
    control could lose many examples where a small one stays level, and the small one's tolerance
    applied to all of them."""
    for control, size in sorted(gated_sizes.items()):
        current = control_figure(figures, "current", control)
        if current is None:  # the current model was not measured on it: nothing to be worse than
            continue
        score = control_figure(figures, name, control)
        tolerance = slice_tolerance(settings, size)
        if score is None or not not_worse(score, current, tolerance):
            shown = "-" if score is None else f"{score:.4f}"
            return (f"{name} on {control}: {shown} is worse than current {current:.4f} beyond the tolerance "
                    f"{tolerance:.4f} ({size} slice labels)")
    return None


def not_worse(candidate: float, current: float, tolerance: float) -> bool:
    """The gate: ``candidate`` at most ``tolerance`` below ``current`` (float sums such as
    0.7 + 0.1 land a hair under 0.8: one slice example's tolerance must cover one example)."""
    return candidate + tolerance >= current - 1e-9


def choose_candidate(scores: dict[str, float], preference, tolerance: float, close_to=None) -> str:
    """The candidate a job keeps: among those within ``tolerance`` of the best figure on the slice
    (a one-example lead on a small slice is noise, not evidence), the first by ``preference(name)``
    (``tie_preference``), then by figure, then by name.  ``close_to(name, best)``, where given,
    says instead whether ``name`` is level with the best (several controls: within each control's
    own tolerance on each of them)."""
    top = max(scores.values())
    if close_to is None:
        close = [name for name, score in scores.items() if not_worse(score, top, tolerance)]
    else:
        best = max((name for name, score in scores.items() if score == top), key=lambda name: (preference(name), name))
        close = [name for name in scores if name == best or close_to(name, best)]
    return max(close, key=lambda name: (preference(name), scores[name], name))


def choose_for_gate(scores: dict[str, float], preference, tolerance: float, passes, close_to=None) -> str:
    """``choose_candidate`` among the candidates that pass the gate (``passes(name)``), or among
    all of them where none does (that version is still written, refused, with its figures).
    Being within ``tolerance`` is not transitive: the tie-preferred candidate within one example
    of the best may be two examples below the current version while the best is one, and the
    job must not refuse what the gate would take."""
    passing = {name: score for name, score in scores.items() if passes(name)}
    return choose_candidate(passing or scores, preference, tolerance, close_to)


def level_on_every_control(figures: dict, sizes: dict[str, int], settings: Settings):
    """``close_to`` for :func:`choose_candidate` with several controls: ``name`` is level with
    ``best`` where, on every control with slice labels (``sizes``), it is within that control's own
    tolerance of ``best``'s figure.  On their mean with the smallest slice's tolerance, a large
    control's lead of several examples counted as a tie beside a 2-label control."""
    def close_to(name: str, best: str) -> bool:
        for control, size in sizes.items():
            theirs = control_figure(figures, best, control)
            if theirs is None:
                continue
            mine = control_figure(figures, name, control)
            if mine is None or not not_worse(mine, theirs, slice_tolerance(settings, size)):
                return False
        return True

    return close_to


def learned_from_pool(guesses: int, n_labels: int, args: TrainingArguments) -> bool:
    """Whether a full recipe that trained on ``guesses`` pseudo-labelled unlabeled tasks ranks as
    "full+pool" on ties: measured from about ``full_min_labels`` labels up (``n_labels``: the
    project's, slice included); with fewer (a GPU, TRAIN_MODE=full) ties keep the order of the
    labels-only recipes."""
    return guesses > 0 and n_labels >= args.full_min_labels


def in_eval_slice(task_id: int, share: float) -> bool:
    """A deterministic, stable share of tasks (by a hash of the task id) never trained on."""
    digest = hashlib.sha256(f"eval:{task_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def contrastive_pairs(settings: Settings) -> int:
    """``CONTRASTIVE_PAIRS``, or where unset 2,560 on CUDA (seconds there) and none on a CPU (about
    five minutes a job on two cores for a gain seen on one seed of two)."""
    if settings.contrastive_pairs >= 0:
        return settings.contrastive_pairs
    return 2560 if resolve_device(settings.device).type == "cuda" else 0


#: unset SELF_TRAIN_TUNE_ROUNDS on a CPU: the second round for projects of at most this many labels
SECOND_ROUND_CPU_MAX_LABELS = 512


def self_train_tune_rounds(settings: Settings) -> int:
    """``SELF_TRAIN_TUNE_ROUNDS``, or where unset 2 (on a CPU, for projects of at most
    ``SECOND_ROUND_CPU_MAX_LABELS`` labels: see :func:`second_round_max_labels`)."""
    if settings.self_train_tune_rounds >= 1:
        return settings.self_train_tune_rounds
    return 2


def second_round_max_labels(settings: Settings) -> int:
    """The most labels a project may have for a job's second round (0: any): where
    ``SELF_TRAIN_TUNE_ROUNDS`` is unset, ``SECOND_ROUND_CPU_MAX_LABELS`` on a CPU, where the second
    round about doubles a full-lane job (on two cores at 64 and 256 AG News labels, 380-440 s beside
    the first round's 185-270 s; what a job serves at 64 went from 0.845 to 0.859) and grows with the
    labels past the pool's guesses; no limit on CUDA (seconds there) or where set."""
    if settings.self_train_tune_rounds >= 1 or resolve_device(settings.device).type == "cuda":
        return 0
    return SECOND_ROUND_CPU_MAX_LABELS


def second_round_wanted(args: TrainingArguments, n_labels: int) -> bool:
    """Whether a job on a project of ``n_labels`` labels trains the second round."""
    limit = args.second_round_max_labels
    return args.self_train_tune_rounds >= 2 and (not limit or n_labels <= limit)


def training_arguments(settings: Settings) -> TrainingArguments:
    return TrainingArguments(
        mode=settings.train_mode,
        learning_rate=settings.learning_rate,
        label_smoothing=settings.label_smoothing,
        batch_size=settings.train_batch_size,
        max_length=settings.train_max_length,
        epochs=settings.train_epochs,
        min_steps=settings.train_min_steps,
        full_min_labels=settings.full_min_labels,
        contrastive_pairs=contrastive_pairs(settings),
        self_train_share=settings.self_train_share,
        self_train_tune_max=settings.self_train_tune_max,
        self_train_tune_rounds=self_train_tune_rounds(settings),
        second_round_max_labels=second_round_max_labels(settings),
        max_train_examples=settings.max_train_examples,
        seed=settings.seed,
    )


@dataclass
class Split:
    train: ControlData
    held: ControlData
    digest: str = ""  # names exactly these labels (task, text, values; train and slice)
    task_ids: frozenset = frozenset()  # every labeled task (train, slice, and any left out by MAX_TRAIN_EXAMPLES)


@dataclass
class Unlabeled:
    """A control's unlabeled tasks from the last refresh's pool: embeddings (as this job embeds) and,
    where the pool kept them, their texts (the full recipe fine-tunes on the surest guesses)."""

    embeddings: np.ndarray
    texts: list[str] | None = None


def _bounded(examples: list, limit: int, seed: int) -> list:
    """At most ``limit`` examples: the newest half, then a replay sample of the older ones."""
    if len(examples) <= limit:
        return examples
    ordered = sorted(examples, key=lambda e: e.seq, reverse=True)
    newest, older = ordered[: limit // 2], ordered[limit // 2 :]
    rng = np.random.default_rng(seed)
    replay = [older[i] for i in sorted(rng.choice(len(older), limit - len(newest), replace=False))]
    return newest + replay


class FineTuneJob:
    def __init__(
        self,
        settings: Settings,
        store,
        registry: ModelRegistry | None = None,
        progress: Progress | None = None,
        mode: str | None = None,
    ):
        self.settings = settings
        self.store = store
        self.registry = registry or ModelRegistry(settings.model_dir)
        self.progress = progress or (lambda update: None)
        self.args = training_arguments(settings)
        self.full_lane = mode is None  # the fast lane runs "frozen" whatever TRAIN_MODE says
        if mode is not None:
            self.args = replace(self.args, mode=mode)
        self.device = resolve_device(settings.device)

    # -- inputs ----------------------------------------------------------------------
    def _plan(self, project_key: str, current: LoadedHeads | None) -> tuple[LabelingPlan, str]:
        config = self.store.latest_label_config(project_key)
        if not config and current is not None:
            config = current.meta.get("label_config")
        if not config:
            raise NothingToTrain("no label config is known for this project yet (connect it in Label Studio)")
        try:
            return plan_for(config), config
        except UnsupportedConfig as exc:
            raise NothingToTrain(str(exc)) from None

    def _data(self, project_key: str, plan: LabelingPlan, heads: dict[str, ClassifierHead],
              encoder: Encoder) -> tuple[dict[str, Split], int]:
        """Each Choices control's training and slice examples; and the labeled tasks of the controls
        left out because every one of their labels fell in the evaluation slice.  A text the model
        reads nothing of (empty, whitespace, zero-width marks) is neither trained on nor judged:
        ``/predict`` suggests nothing for it, and its embedding is the special tokens alone."""
        splits, slice_only = {}, 0
        for control in plan.controls:
            if control.kind != CHOICES or control.name not in heads:
                continue
            examples = self.store.training_examples(project_key, control)
            train, held, blank = [], [], 0
            for example in examples:
                if reads_nothing(encoder, example.text):
                    blank += 1
                    continue
                (held if in_eval_slice(example.task_id, self.settings.eval_share) else train).append(example)
            if blank:
                log.info("project %s: %d labeled task(s) of %s hold no text the model reads; left out", project_key,
                         blank, control.name)
            # a text the slice holds is not trained on under another task's id (a duplicate task): the
            # slice would judge a model on a text it learned
            judged = {example.text for example in held}
            kept = [example for example in train if example.text not in judged]
            if len(kept) < len(train):
                log.info("project %s: %d labeled task(s) of %s repeat a text of the evaluation slice; not trained on",
                         project_key, len(train) - len(kept), control.name)
            train = kept
            train = _bounded(train, self.args.max_train_examples, self.args.seed)
            labels = heads[control.name].labels

            def as_data(rows):
                return ControlData(control.name, list(labels), control.multiple, [e.text for e in rows], [tuple(e.labels) for e in rows])

            if not train:
                slice_only += len(held)
            else:
                digest = hashlib.sha256()
                for part, rows in (("train", train), ("held", held)):
                    for e in sorted(rows, key=lambda e: e.task_id):
                        line = f"{part}\x00{e.task_id}\x00{e.text}\x00{json.dumps(list(e.labels))}\n"
                        digest.update(line.encode("utf-8", "surrogatepass"))  # (a lone surrogate is stored as sent)
                splits[control.name] = Split(
                    as_data(train), as_data(held), digest.hexdigest(), frozenset(e.task_id for e in examples)
                )
        return splits, slice_only

    # -- the job ---------------------------------------------------------------------
    def run(self, project_key: str, trigger: str = "manual") -> dict:
        cutoff = self.store.current_seq(project_key)
        try:
            return self._run(project_key, trigger, cutoff)
        except NothingToTrain as exc:
            # its labels count as seen, whatever the reason (a label config that cannot be trained
            # too): else every label trigger, and the job's own check for labels behind it, would
            # queue the same job again, and again (a project the store does not know has none)
            from .store import UnknownProject

            with contextlib.suppress(UnknownProject):
                self.store.mark_trained(project_key, cutoff, self.full_lane)
            exc.cutoff_seq = cutoff
            raise

    def _run(self, project_key: str, trigger: str, cutoff: int) -> dict:
        started = time.time()
        set_seed(self.args.seed)
        # the current version, or where its pointer is missing or names a version gone or unreadable,
        # the version that stands in for it (as the web workers serve): never a cold start over a
        # trained model, and never a job that fails until someone mends the pointer
        current = self.registry.readable_current(project_key)
        plan, config = self._plan(project_key, current)
        base_encoder = Encoder(
            current.encoder_path if current and current.encoder_path else self.settings.encoder_path,
            self.device,
            self.settings.max_length,
            self.settings.inference_precision,  # the frozen embeddings are the served ones
        )
        other_base = current is not None and built_on_other_base(current, self.settings.encoder_path, base_encoder.dim)
        if other_base:
            # BASE_MODEL changed: what was learned on the old one means nothing to the new one; the
            # job starts from a cold start on BASE_MODEL (as the web workers do) and trains it on every label
            log.warning("project %s: version %s was %s; starting from a cold start on BASE_MODEL", project_key,
                        current.version, other_base)
            if current.encoder_path:
                base_encoder = Encoder(self.settings.encoder_path, self.device, self.settings.max_length,
                                       self.settings.inference_precision)
        if other_base or current is None or current.meta.get("plan_signature") != plan.signature:
            # the cold start, or the current heads re-shaped to the config (new labels start zero-shot)
            with self.registry.lock(project_key):
                current = self.registry.readable_current(project_key)
                if current is not None and built_on_other_base(current, self.settings.encoder_path, base_encoder.dim):
                    current = None  # no parent: its rows mean nothing to BASE_MODEL's embeddings
                if current is None or current.meta.get("plan_signature") != plan.signature:
                    current = self.registry.write_plan_version(project_key, plan, current, base_encoder, self.settings)
        start_heads = dict(current.heads)
        splits, slice_only = self._data(project_key, plan, start_heads, base_encoder)
        token_splits = token_data(self.store, project_key, plan, start_heads, self.settings, self.args, base_encoder)
        if not splits and not token_splits:
            self.store.mark_trained(project_key, cutoff, self.full_lane)
            if slice_only:  # labels there are, but the slice holds them all: say so, and what helps
                raise NothingToTrain(
                    f"all {slice_only} labeled task(s) are in the evaluation slice (EVAL_SHARE="
                    f"{self.settings.eval_share:g}), which is never trained on: label a few more tasks"
                )
            raise NothingToTrain("no labeled tasks for any control")
        n_train = sum(len(s.train) for s in splits.values()) + sum(len(s.train) for s in token_splits.values())
        # the project's labels, slice included: what FULL_MIN_LABELS counts here and when it queues the job
        # (counting training labels only, a 64-label project whose slice drew 15 got no fine-tune)
        n_labels = sum(len(s.train) + len(s.held) for part in (splits, token_splits) for s in part.values())
        wants_full = self.args.mode == "full" or (
            self.args.mode == "auto" and (n_labels >= self.args.full_min_labels or self.device.type == "cuda")
        )
        wants_full = wants_full and self.args.mode != "frozen" and not encoder_is_taken(start_heads, token_splits)
        # the labels this job would learn from; NER data is not covered, so those jobs always run
        # (and the label config's shape: the same labels under other labels or another choice kind are news)
        digest = "" if token_splits else hashlib.sha256(
            (plan.signature + "|" + "".join(f"{name}:{split.digest};" for name, split in sorted(splits.items()))).encode()
        ).hexdigest()
        if wants_full and digest:
            # the encoder was tuned on exactly these labels already, from what serves now: the serving
            # version itself, or one the gate kept back against it (a version of long ago, since
            # left behind, is no reason: labels deleted since go back to what it learned from)
            tried = [v.name for v in self.registry.versions(project_key)
                     if v.meta.get("data_digest") == digest and v.meta.get("recipe") in ENCODER_RECIPES
                     and current.version in (v.name, v.meta.get("parent"))]
            if tried:
                if self.args.mode == "full":
                    self.store.mark_trained(project_key, cutoff, self.full_lane)
                    raise NothingToTrain(f"full fine-tuning on these labels was tried in {tried[-1]}")
                log.info("project %s: full fine-tuning on these labels was tried in %s", project_key, tried[-1])
                wants_full = False
        if digest and current.meta.get("data_digest") == digest and not wants_full:
            # nothing new to learn: the same labels would give the same candidates again
            self.store.mark_trained(project_key, cutoff, self.full_lane)
            raise NothingToTrain(f"no label changed since {current.version}, which was trained on these labels")
        self.progress({"stage": "embedding", "labels": n_train})

        # frozen embeddings of every text the job touches, with the current encoder
        cache = EmbeddingCache(self.settings.local_cache_dir)
        embedded_with = encoder_id(current.meta, self.settings.encoder_path, base_encoder)
        embed = {}
        for name, split in splits.items():
            embed[name] = (
                cache.encode(base_encoder, embedded_with, split.train.texts, self.settings.batch_size)[0],
                cache.encode(base_encoder, embedded_with, split.held.texts, self.settings.batch_size)[0],
            )

        # the current model measured on the slice
        current_heads = {name: start_heads[name] for name in splits}
        figures: dict[str, dict] = {"current": self._measure(current_heads, splits, embed)}

        # candidate 1: the fast head on frozen embeddings
        fast_heads = dict(start_heads)
        fast_report = {}
        for name, split in splits.items():
            head, report = fit_head(embed[name][0], split.train, start_heads[name], self.args.seed)
            fast_heads[name] = head
            fast_report[name] = report
        self.progress({"stage": "fast-head", "labels": n_train})
        candidates = {"frozen": (fast_heads, None, fast_report)}
        figures["frozen"] = self._measure({n: fast_heads[n] for n in splits}, splits, embed)

        # candidate 1b: the fast head self-trained on the project's unlabeled tasks (seconds)
        unlabeled = self._unlabeled(project_key, current.version, embedded_with, splits,
                                    {name: pair[1] for name, pair in embed.items()})
        taught = fast_heads
        if unlabeled:
            taught = dict(fast_heads)
            taught_report = {}
            for name, rows in unlabeled.items():
                taught[name], taught_report[name] = self_train_head(
                    embed[name][0], splits[name].train, rows.embeddings, fast_heads[name], start_heads[name], self.args
                )
            self.progress({"stage": "self-train", "labels": n_train})
            candidates["self-train"] = (taught, None, taught_report)
            figures["self-train"] = self._measure({n: taught[n] for n in splits}, splits, embed)

        # candidate 2: full fine-tuning, when it makes sense for the size
        full_learned_from_pool = False  # the full recipe also trained on the pool's guesses
        if wants_full:
            # early stopping and the temperature use a split of the training labels, never the slice
            fit, valid = map(list, zip(*(split_for_validation(s.train, 0.15, self.args.seed) for s in splits.values())))
            labels_only = list(fit)
            # with the project's unlabeled texts, the encoder also learns from the self-trained head's
            # surest guesses; the heads start from the best fast heads (self-trained where they are)
            pseudo_report = {}
            for i, name in enumerate(splits):
                rows = unlabeled.get(name)
                if rows is not None and rows.texts is not None and self.args.self_train_tune_max > 0:
                    fit[i], pseudo_report[name] = with_pseudo_labels(
                        fit[i], taught[name], rows.embeddings, rows.texts, self.args
                    )
            student, full_heads, full_report = fine_tune(
                base_encoder, taught, fit, self.args, self.progress, validation=valid
            )
            if pseudo_report:
                full_report["pseudo_labels"] = pseudo_report
                guesses = sum(part["pseudo_labels"] for part in pseudo_report.values())
                full_learned_from_pool = learned_from_pool(guesses, n_labels, self.args)
            merged = dict(start_heads)
            merged.update(full_heads)
            served = student.reading_as(base_encoder)  # judged on what the web workers will compute
            held_embed = {
                name: (None, served.encode(split.held.texts, self.settings.batch_size)) for name, split in splits.items()
            }
            candidates["full"] = (merged, student, full_report)
            figures["full"] = self._measure({n: merged[n] for n in splits}, splits, held_embed)
            # candidate 2b: a second round, the fine-tuned model as teacher: it guesses the pool anew
            # (better than the fast head did) and a student from the same start learns from the
            # labels and its surest guesses
            if second_round_wanted(self.args, n_labels) and pseudo_report:
                second = self._second_round(base_encoder, taught, labels_only, valid, splits, unlabeled, student,
                                            merged, pseudo_report)
                candidates["full-2"] = second[0]
                figures["full-2"] = second[1]
                # candidate 2c: the two rounds' weight average (no training: seconds)
                candidates["soup"], figures["soup"] = self._soup(base_encoder, candidates["full"], second[0], valid,
                                                                 splits)
            # candidate 3: contrastive pairs tune the encoder, then fast heads on its embeddings
            tuned, contrastive_report = contrastive_tune(
                base_encoder, [s.train for s in splits.values()], self.args, self.progress
            )
            if tuned is not None:
                tuned_heads = dict(start_heads)
                tuned_embed = {}
                reader = tuned.reading_as(base_encoder)  # heads fitted and judged as they will be served
                for name, split in splits.items():
                    tuned_embed[name] = (
                        reader.encode(split.train.texts, self.settings.batch_size),
                        reader.encode(split.held.texts, self.settings.batch_size),
                    )
                    control = plan.control(name)
                    prior = zero_shot_head(control, reader, self.settings.zero_shot_template,
                                           self.settings.zero_shot_temperature, self.settings.multi_label_threshold)
                    tuned_heads[name], contrastive_report[f"head:{name}"] = fit_head(
                        tuned_embed[name][0], split.train, prior, self.args.seed
                    )
                candidates["contrastive"] = (tuned_heads, tuned, contrastive_report)
                figures["contrastive"] = self._measure({n: tuned_heads[n] for n in splits}, splits, tuned_embed)
        # TRAIN_MODE=full serves the fine-tune alone; where the encoder serves a trained entity
        # head and this job has no span labels, it cannot be tuned for the Choices, and the
        # fast heads are all there is to train
        if self.args.mode == "full" and (wants_full or token_splits):
            for name in FAST_RECIPES:
                candidates.pop(name, None)
        class_splits = splits
        if token_splits:  # NER labels: the encoder is tuned for them (see ner_job)
            candidates, figures = token_candidates(
                self, plan, base_encoder, start_heads, splits, token_splits, candidates, figures
            )
            splits = {**splits, **token_splits}

        # choose the best candidate on the slice, then gate it against the current model
        def primary(name: str) -> float:
            return figures[name]["score"] if figures[name]["score"] is not None else -1.0

        held_sizes = {name: len(s.held) for name, s in splits.items() if len(s.held)}
        held_size = slice_size(held_sizes.values())
        # the gate judges each control whose slice holds EVAL_MIN labels; a control with fewer (one
        # added last week) is measured but does not turn the gate off for the others
        gated_sizes = {name: n for name, n in held_sizes.items() if n >= self.settings.eval_min}
        # one example of a small slice is worth more than PROMOTION_TOLERANCE: a single
        # disagreement on 12 labels is noise, not evidence that one model is better
        tolerance = slice_tolerance(self.settings, held_size)

        def choose(passes=lambda name: True) -> str:
            return choose_for_gate(
                {name: primary(name) for name in candidates},
                lambda name: tie_preference(name, full_learned_from_pool),
                tolerance,
                passes,
                level_on_every_control(figures, held_sizes, self.settings) if len(held_sizes) > 1 else None,
            )

        best = choose()
        # decide, write and promote under the project lock, so a pin or rollback cannot interleave
        with self.registry.lock(project_key):
            # a version promoted while this job trained (a fast-lane job, a rollback) is what the
            # candidate must beat: measure it on the same slice
            against, serving = current.version, current
            config_moved = None  # a version for another label config promoted while this job trained
            if (self.registry.current(project_key) or current.version) != current.version:
                latest = self.registry.readable_current(project_key)  # (or its stand-in, as served)
                if latest is not None and latest.version != current.version:
                    against = latest.version
                    signature = latest.meta.get("plan_signature")
                    if signature == plan.signature:
                        figures["current"] = self._measure_version(
                            latest, current, class_splits, embed, token_splits, base_encoder
                        )
                        serving = latest
                    elif signature is not None:
                        config_moved = latest.version
            # the fast head on these very labels already serves: a second copy is no news
            frozen_serves = (
                bool(digest) and serving.meta.get("data_digest") == digest and serving.meta.get("recipe") in FAST_RECIPES
            )
            if frozen_serves:
                for name in FAST_RECIPES:
                    candidates.pop(name, None)
                if not candidates:
                    self.store.mark_trained(project_key, cutoff, self.full_lane)
                    raise NothingToTrain(f"no label changed since {serving.version}, which was trained on these labels")
                best = choose()
            gated = bool(gated_sizes)
            pinned = self.registry.pinned(project_key)

            def passes(name: str) -> bool:
                if frozen_serves:
                    return primary(name) >= primary("current")
                return not gated or gate_failure(figures, name, gated_sizes, self.settings) is None

            if not pinned and not self.settings.force_promote:
                best = choose(passes)
            if config_moved:  # its labels are not the project's any more: the next job trains for the new ones
                promote, reason = False, (
                    f"the label config changed while this job trained ({config_moved} serves the new one): "
                    "kept, not promoted; the next job trains for the new config"
                )
            elif pinned:
                promote, reason = False, f"the project is pinned to {pinned} (unpin to take new versions)"
            elif self.settings.force_promote:
                promote, reason = True, "FORCE_PROMOTE is set"
            elif frozen_serves and primary(best) < primary("current"):
                promote, reason = False, (
                    f"{best} {primary(best):.4f} is below the serving fast head on the same labels "
                    f"({serving.version}, {primary('current'):.4f})"
                )
            elif not gated:
                largest = max(held_sizes.values(), default=0)
                promote, reason = True, (
                    f"evaluation slice has {largest} labels (< EVAL_MIN={self.settings.eval_min}"
                    f"{' on every control' if len(held_sizes) > 1 else ''}): promoted ungated"
                )
            elif (failure := gate_failure(figures, best, gated_sizes, self.settings)) is None:
                promote, reason = True, f"{best} {primary(best):.4f} vs current {primary('current'):.4f}: not worse"
                if len(held_sizes) > 1:
                    reason += f" on {', '.join(sorted(gated_sizes))}"
            else:
                promote, reason = False, failure
            heads, student, _ = candidates[best]
            meta = {
                "parent": current.version,
                "kind": "fine-tune",
                "recipe": best,
                "trigger": trigger,
                "encoder": current.meta.get("encoder") if student is None else None,
                "encoder_stamp": current.meta.get("encoder_stamp") if student is None else None,
                "base_model": self.settings.encoder_path,
                "base_stamp": weights_stamp(self.settings.encoder_path),
                "plan_signature": plan.signature,
                "plan": [c.signature() for c in plan.controls],
                "label_config": config,
                "data": {
                    name: {"train": len(s.train), "eval": len(s.held)} for name, s in splits.items()
                },
                "cutoff_seq": cutoff,
                "metrics": figures,
                "training": {name: report for name, (_, _, report) in candidates.items()},
                "decision": {"promoted": promote, "reason": reason, "gated": gated, "against": against},
                "data_digest": digest,
                "seconds": round(time.time() - started, 2),
            }
            writer = (lambda folder: save_encoder(student, folder)) if student is not None else None
            version = self.registry.create_version(project_key, heads, meta, write_encoder=writer)
            if promote:
                self.registry.promote(project_key, version, reason=f"{best}: {reason}")
        if not config_moved:  # (else these labels still count towards the next job's trigger)
            self.store.mark_trained(project_key, cutoff, self.full_lane)
        log.info("project %s: job made %s (%s); %s", project_key, version, best, reason)
        return {
            "project": project_key,
            "version": version,
            "promoted": promote,
            "reason": reason,
            "recipe": best,
            "labels": n_train,
            "metrics": figures,
            "cutoff_seq": cutoff,
            "seconds": meta["seconds"],
        }

    def _unlabeled(self, project_key: str, version: str, embedded_with: str, splits: dict[str, Split],
                   held_embeddings: dict[str, np.ndarray] | None = None) -> dict[str, Unlabeled]:
        """The project's unlabeled tasks for self-training, by control: the pool the last refresh of
        predictions kept (``sampling.PoolStore``), when it was embedded exactly as this job embeds
        (same encoder, same precision) for a single-label control this job trains; tasks labeled,
        skipped or deleted since and tasks of the evaluation slice are left out, and a pool over
        ``self_train_max_pool`` is sampled."""
        if self.args.self_train_share <= 0:
            return {}
        pool = PoolStore(self.registry).best(project_key, version)
        if pool is None or pool.meta.get("encoder") != embedded_with:
            return {}
        name = pool.meta.get("control")
        split = splits.get(name)
        if split is None or split.train.multiple:
            return {}
        held_embeddings = (held_embeddings or {}).get(name)
        # labeled since the refresh, skipped, or deleted in Label Studio: not the project's unlabeled tasks
        gone = set(split.task_ids) | skipped_task_ids(self.store, project_key, pool.meta.get("started_at"))
        rows = np.flatnonzero(~np.isin(pool.task_ids, np.fromiter(gone, dtype=np.int64)))
        # the slice's tasks are never trained on, labeled or not: no guess on one of them either, or
        # the model that fitted its own guess would later be judged on that very task's label
        share = self.settings.eval_share
        rows = rows[np.array([not in_eval_slice(int(t), share) for t in pool.task_ids[rows]], dtype=bool)]
        # nor on a slice text under another task's id (a duplicate task), as for labeled copies
        judged = set(split.held.texts)
        if judged and pool.texts is not None:
            rows = rows[np.array([pool.texts[r] not in judged for r in rows], dtype=bool)]
        elif judged and held_embeddings is not None and len(held_embeddings) and len(rows):
            # a pool kept without its texts: the same text is the same embedding (up to the pool's float16)
            x = pool.embeddings[rows].astype(np.float32)
            h = np.asarray(held_embeddings, dtype=np.float32)
            x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-9)
            h = h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-9)
            rows = rows[(x @ h.T).max(axis=1) < 0.999]
        if len(rows) < SELF_TRAIN_MIN_POOL:
            return {}
        if len(rows) > self.args.self_train_max_pool:
            keep = np.random.default_rng(self.args.seed).choice(len(rows), self.args.self_train_max_pool, replace=False)
            rows = rows[np.sort(keep)]
        texts = [pool.texts[r] for r in rows] if pool.texts is not None else None
        return {name: Unlabeled(pool.embeddings[rows], texts)}

    def _second_round(self, base_encoder, taught, labels_only, valid, splits, unlabeled, teacher, teacher_heads,
                      first_round) -> tuple[tuple, dict]:
        """The second round of the full recipe with the project's unlabeled tasks (noisy student):
        the candidate ``(heads, encoder, report)`` and its slice figures."""
        fit, report = list(labels_only), {}
        rounds = replace(self.args, self_train_tune_share=self.args.second_round_share,
                         self_train_tune_max=self.args.second_round_max)
        for i, name in enumerate(splits):
            if name in first_round:
                rows = unlabeled[name]
                guessed = teacher.encode(rows.texts, self.settings.batch_size)
                fit[i], report[name] = with_pseudo_labels(fit[i], teacher_heads[name], guessed, rows.texts, rounds)
        self.progress({"stage": "full-2"})
        student, heads, full_report = fine_tune(base_encoder, taught, fit, self.args, self.progress, validation=valid)
        full_report["pseudo_labels"] = report
        merged = {**teacher_heads, **heads}
        served = student.reading_as(base_encoder)
        held_embed = {name: (None, served.encode(split.held.texts, self.settings.batch_size))
                      for name, split in splits.items()}
        return (merged, student, full_report), self._measure({n: merged[n] for n in splits}, splits, held_embed)

    def _soup(self, base_encoder, first, second, valid, splits) -> tuple[tuple, dict]:
        """The mean of the two rounds' students (``average_students``): the candidate
        ``(heads, encoder, report)`` and its slice figures."""
        (first_heads, first_student, _), (second_heads, second_student, _) = first, second
        self.progress({"stage": "soup"})
        encoder, heads = average_students(first_student, second_student, {n: first_heads[n] for n in splits},
                                          {n: second_heads[n] for n in splits}, valid)
        merged = {**first_heads, **heads}
        served = encoder.reading_as(base_encoder)
        held_embed = {name: (None, served.encode(split.held.texts, self.settings.batch_size))
                      for name, split in splits.items()}
        report = {"of": ["full", "full-2"], "weight": 0.5,
                  "temperature": {name: round(head.temperature, 4) for name, head in heads.items()}}
        return (merged, encoder, report), self._measure({n: merged[n] for n in splits}, splits, held_embed)

    def _measure_version(
        self,
        version: LoadedHeads,
        measured: LoadedHeads,
        splits: dict[str, Split],
        embed: dict,
        token_splits: dict | None = None,
        measured_encoder: Encoder | None = None,
    ) -> dict:
        """``version``'s figures on the slice, Labels controls (``token_splits``) included; the
        job's embeddings and ``measured_encoder`` serve when it reads with the same encoder as
        ``measured`` (the version they were made with), else its own encoder is loaded."""
        same_reader = version.encoder_path == measured.encoder_path
        encoder = measured_encoder if same_reader else None
        if encoder is None and (token_splits or not same_reader):
            encoder = Encoder(
                version.encoder_path or self.settings.encoder_path,
                self.device,
                self.settings.max_length,
                self.settings.inference_precision,
            )
        if not same_reader:
            embed = {name: (None, encoder.encode(split.held.texts, self.settings.batch_size)) for name, split in splits.items()}
        figures = self._measure({name: version.heads[name] for name in splits}, splits, embed)
        if token_splits:
            figures = version_figures(figures, encoder, version.heads, token_splits, self.settings.batch_size)
        return figures

    def _measure(self, heads: dict[str, ClassifierHead], splits: dict[str, Split], embed: dict) -> dict:
        per_control = {}
        scores = []
        for name, split in splits.items():
            if not len(split.held):
                continue
            probs = heads[name].probabilities(embed[name][1])
            metrics = evaluate(probs, split.held, heads[name])
            per_control[name] = metrics
            scores.append(metrics["primary"])
        return {"score": float(np.mean(scores)) if scores else None, "controls": per_control}
