"""Training: the fast head on frozen embeddings, and full fine-tuning of encoder + heads.

Both produce the same model shape (see ``model``), so any result is a version the
predictor loads.  Nothing here touches the registry pointer or the queue.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from .model import ClassifierHead, Encoder
from .precision import TrainingStep

log = logging.getLogger(__name__)

Progress = Callable[[dict], None]


@dataclass(frozen=True)
class TrainingArguments:
    """Every knob of a training job; defaults need no tuning (see the README's training section)."""

    mode: str = "auto"  # auto | frozen | full
    learning_rate: float = 1e-4  # encoder, full mode
    head_learning_rate: float = 1e-3  # heads, full mode
    batch_size: int = 16
    max_length: int = 128
    epochs: int = 0  # 0: scaled to the label count (``full_schedule``)
    min_steps: int = 50
    max_epochs: int = 20
    target_examples: int = 2048  # full mode: epochs = ceil(target_examples / labels), within [3, max_epochs]
    warmup_ratio: float = 0.1
    # early stopping trusts a validation split of at least this many labels; a smaller one only
    # calibrates (one example of 38 flips its accuracy by 2.6 points: at 256 AG News labels it kept
    # the second epoch's state; bench/label_efficiency.py, 3 seeds: 0.821 before, 0.851 after)
    early_stopping_min: int = 200
    weight_decay: float = 0.01
    # full mode, single-label controls: this share of each target spread over every label (the
    # guesses the recipe trains on are often wrong, and a hard 1.0 on each one teaches their errors;
    # bench/label_efficiency.py, seeds 0-2: SST-2 at 256 labels 0.776 -> 0.789, see the README)
    label_smoothing: float = 0.1
    full_min_labels: int = 50  # auto mode on a CPU: fine-tune the encoder from this many labels (slice included)
    # contrastive candidate (SetFit-style pairs, then the fast head on the tuned encoder)
    contrastive_pairs: int = 2560  # at most this many pairs per control (0: no contrastive candidate)
    contrastive_rounds: int = 20  # each labeled text anchors this many pairs of each kind, within the cap
    contrastive_learning_rate: float = 2e-5
    # self-training of the fast head on the project's unlabeled tasks (the last refresh's pool)
    self_train_share: float = 0.5  # share of the pool taken as pseudo-labels each round (0: off)
    self_train_rounds: int = 2
    self_train_max_pool: int = 20_000  # a seeded sample of a larger pool
    # the full recipe also trains on the self-trained head's surest guesses, with their texts:
    # this share of the pool, at most this many texts (0: labels only)
    self_train_tune_share: float = 0.25
    self_train_tune_max: int = 1024
    # a second round (``self_train_tune_rounds=2``): the first round's fine-tuned model guesses the pool
    # anew, and a student fine-tuned from the same start learns from the labels and this share of its
    # surest guesses, at most this many
    self_train_tune_rounds: int = 1
    second_round_max_labels: int = 0  # the second round only for projects of at most this many labels (0: any)
    second_round_share: float = 0.5
    second_round_max: int = 2048
    max_train_examples: int = 20_000  # bounded work per job: newest first, then a replay sample
    seed: int = 13


@dataclass
class ControlData:
    """Training examples of one classification control."""

    name: str
    labels: list[str]  # the head's label order
    multiple: bool
    texts: list[str]
    targets: list[tuple[str, ...]]  # label values per example

    def __len__(self) -> int:
        return len(self.texts)

    def target_array(self) -> np.ndarray:
        index = {label: i for i, label in enumerate(self.labels)}
        if self.multiple:
            y = np.zeros((len(self.targets), len(self.labels)), dtype=np.float32)
            for row, values in enumerate(self.targets):
                for value in values:
                    y[row, index[value]] = 1.0
            return y
        return np.array([index[values[0]] for values in self.targets], dtype=np.int64)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -- fast head ------------------------------------------------------------------------
def _fit_linear(
    x: torch.Tensor, y: torch.Tensor, prior_w: torch.Tensor, prior_b: torch.Tensor, l2: float, multiple: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-regularised logistic regression pulled towards ``prior_w`` (and the bias towards
    ``prior_b`` with the same weight: left free, a handful of labels of skewed counts set it to
    their frequencies, and it outvoted the rows); full-batch L-BFGS on the exact loss and gradient
    in numpy (small matrices: framework overhead would dominate)."""
    from scipy.optimize import minimize

    X = x.numpy().astype(np.float64)
    n, dim = X.shape
    k = prior_w.shape[0]
    W0 = prior_w.numpy().astype(np.float64)
    b0 = prior_b.numpy().astype(np.float64)
    if multiple:
        Y = y.numpy().astype(np.float64)
    else:
        Y = np.zeros((n, k))
        Y[np.arange(n), y.numpy()] = 1.0

    def loss_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        W = theta[: k * dim].reshape(k, dim)
        b = theta[k * dim :]
        logits = X @ W.T + b
        if multiple:
            p = 1.0 / (1.0 + np.exp(-logits))
            delta = (p - Y) / (n * k)
            loss = float(np.sum(np.logaddexp(0.0, logits) - Y * logits) / (n * k))
        else:
            shifted = logits - logits.max(axis=1, keepdims=True)
            log_norm = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
            log_p = shifted - log_norm
            loss = float(-(Y * log_p).sum() / n)
            delta = (np.exp(log_p) - Y) / n
        diff, shift = W - W0, b - b0
        loss += 0.5 * l2 * float((diff**2).sum() + (shift**2).sum())
        grad_w = delta.T @ X + l2 * diff
        grad_b = delta.sum(axis=0) + l2 * shift
        return loss, np.concatenate([grad_w.ravel(), grad_b])

    start = np.concatenate([W0.ravel(), b0])
    # one BLAS thread: these products are tiny, and spinning BLAS threads on a shared
    # machine made each fit 50x slower (measured)
    with threadpool_limits(limits=1, user_api="blas"):
        found = minimize(loss_and_grad, start, jac=True, method="L-BFGS-B", options={"maxiter": 500, "gtol": 1e-6})
    theta = found.x
    weight = torch.from_numpy(theta[: k * dim].reshape(k, dim).astype(np.float32))
    bias = torch.from_numpy(theta[k * dim :].astype(np.float32))
    return weight, bias


def _score(logits: torch.Tensor, y: torch.Tensor, multiple: bool, threshold: float = 0.5) -> float:
    """The figure the gate compares (``evaluate``'s primary): accuracy, or for several labels per task
    micro-F1 of the labels suggested as served (those at ``threshold``, else the likeliest alone)."""
    if multiple:
        if not len(y):
            return 0.0
        predicted = suggested_labels(torch.sigmoid(logits.float()).numpy(), threshold)
        return _micro_f1(predicted, y.numpy() > 0.5)
    return float((logits.argmax(dim=1) == y).float().mean())


#: Candidate regularisers for the fast head, chosen per job by cross-validation on the
#: training labels: (prior, strength c; the L2 weight is c / n).  "zero-shot" pulls the
#: rows towards the label-name embeddings (strong with few labels); "none" towards 0.
HEAD_GRID: tuple[tuple[str, float], ...] = (("zero-shot", 0.25), ("zero-shot", 1.0), ("none", 0.05), ("none", 1.0))
ZERO_SHOT_PRIOR_SCALE = 10.0  # prior rows = unit label embeddings x 10 (a softmax temperature of 0.1)


def _prior_rows(prior: ClassifierHead | None, k: int, dim: int) -> torch.Tensor:
    """The rows a head is pulled towards under the "zero-shot" prior: the prior head's rows at
    unit length x ``ZERO_SHOT_PRIOR_SCALE`` (zeros without a prior)."""
    if prior is None:
        return torch.zeros(k, dim)
    # rows of labels still zero-shot define the prior; learned rows are kept as they are
    rows = torch.from_numpy(prior.weight.astype(np.float32))
    return rows / rows.norm(dim=1, keepdim=True).clamp(min=1e-6) * ZERO_SHOT_PRIOR_SCALE


def _fold_of(n: int, folds: int, seed: int) -> np.ndarray:
    """A seeded assignment of ``n`` rows to ``folds`` cross-validation folds (at least 2)."""
    fold_of = np.empty(n, dtype=np.int64)
    fold_of[np.random.default_rng(seed).permutation(n)] = np.arange(n) % max(2, min(folds, n))
    return fold_of


def _out_of_fold_logits(
    x: torch.Tensor,
    y: torch.Tensor,
    fold_of: np.ndarray,
    prior_w: torch.Tensor,
    l2: float,
    multiple: bool,
    always: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Each row's logits from the head fitted without its fold (and with the ``always`` rows,
    ``(x, y)`` that every fold trains on)."""
    logits = torch.zeros(len(x), prior_w.shape[0])
    for fold in range(fold_of.max() + 1):
        train, held = fold_of != fold, fold_of == fold
        if not held.any() or not train.any():
            continue
        fit_x, fit_y = x[train], y[train]
        if always is not None:
            fit_x, fit_y = torch.cat([fit_x, always[0]]), torch.cat([fit_y, always[1]])
        w, b = _fit_linear(fit_x, fit_y, prior_w, torch.zeros(prior_w.shape[0]), l2, multiple)
        logits[torch.from_numpy(held)] = x[held] @ w.T + b
    return logits


def prior_logits(prior: ClassifierHead, x: torch.Tensor) -> torch.Tensor:
    """The logits ``prior`` gives ``x`` (its temperature applied): what its accuracy is read from."""
    logits = (x.numpy() @ prior.weight.T + prior.bias) / prior.temperature
    return torch.from_numpy(np.asarray(logits, dtype=np.float32))


def _fewest_per_label(y: torch.Tensor, k: int, multiple: bool) -> int:
    """The fewest examples any label has (positives, for several labels per task)."""
    counts = y.sum(dim=0) if multiple else torch.bincount(y, minlength=k)
    # a label no example has is never the answer, so no fold misses it (an unused "Other" kept every
    # head at temperature 1)
    used = counts[counts > 0]
    return int(used.min()) if len(used) else 0


def fit_head(
    embeddings: np.ndarray,
    data: ControlData,
    prior: ClassifierHead | None,
    seed: int = 13,
    folds: int = 4,
) -> tuple[ClassifierHead, dict]:
    """Refit a control's head on frozen embeddings; seconds even for thousands of labels.

    The regulariser is picked from ``HEAD_GRID`` by ``folds``-fold cross-validation on
    the training labels (never the evaluation slice); the chosen setting is refit on all
    of them.  An untrained ``prior`` (the zero-shot head) competes as it is: its accuracy on
    the labels is as honest as the others' out-of-fold one, since it never saw them, and it
    wins ties (with 8-16 labels a fitted head scored below it on most draws; measured in the
    README).  It is also kept with fewer than 8 labels.  The temperature is fitted out-of-fold
    only where every label has an example in each fold's fit; else 1 (a label missing from a
    fold's fit is guessed wrong with confidence there, and the fit ran to the grid's end).
    Returns the head and what was chosen.
    """
    started = time.perf_counter()
    x = torch.from_numpy(np.asarray(embeddings, dtype=np.float32))
    y = torch.from_numpy(data.target_array())
    n, dim = x.shape
    k = len(data.labels)
    priors = {"zero-shot": _prior_rows(prior, k, dim), "none": torch.zeros(k, dim)}
    threshold = prior.threshold if prior is not None else 0.5  # (several labels per task: as served)
    fold_of = _fold_of(n, folds, seed)
    scores = {}
    out_of_fold: dict[tuple[str, float], torch.Tensor] = {}
    # the untrained prior competes while some label has fewer examples than folds: there the
    # out-of-fold figures are least sure, and fits were worst (past that, their figures, each
    # from three quarters of the labels, would undersell them against the prior's on all)
    in_every_fold = _fewest_per_label(y, k, data.multiple) >= max(2, min(folds, n))  # (the folds _fold_of makes)
    keepable = prior is not None and not prior.trained and list(prior.labels) == list(data.labels) and not in_every_fold
    for name, strength in HEAD_GRID:
        if n < 8:  # too few for cross-validation: trust the prior
            break
        logits = _out_of_fold_logits(x, y, fold_of, priors[name], strength / n, data.multiple)
        out_of_fold[(name, strength)] = logits
        scores[(name, strength)] = _score(logits, y, data.multiple, threshold)
    kept = _score(prior_logits(prior, x), y, data.multiple, threshold) if keepable and n else 0.0
    if keepable and (not scores or kept >= max(scores.values())):
        return prior, {
            "temperature": round(float(prior.temperature), 4), "prior": "kept", "l2": None,
            "cv_accuracy": None, "kept_accuracy": round(kept, 4),
            "cv": {f"{name}:{strength}": round(score, 4) for (name, strength), score in scores.items()},
            "seconds": round(time.perf_counter() - started, 3),
        }
    if scores:
        choice = max(scores, key=lambda key: (scores[key], key[0] == "zero-shot", key[1]))
        temperature = 1.0
        if in_every_fold:
            temperature = fit_temperature(out_of_fold[choice].numpy(), y.numpy(), data.multiple)
    else:
        choice = ("zero-shot", 1.0)
        temperature = 1.0
    weight, bias = _fit_linear(x, y, priors[choice[0]], torch.zeros(k), choice[1] / max(n, 1), data.multiple)
    head = ClassifierHead(
        labels=list(data.labels),
        weight=weight.numpy(),
        bias=bias.numpy(),
        multiple=data.multiple,
        temperature=temperature,
        threshold=prior.threshold if prior is not None else 0.5,
        trained=True,
        zero_shot_rows=[],
    )
    report = {
        "temperature": round(temperature, 4),
        "prior": choice[0],
        "l2": choice[1] / max(n, 1),
        "cv_accuracy": scores.get(choice),
        "cv": {f"{name}:{strength}": round(score, 4) for (name, strength), score in scores.items()},
        "seconds": round(time.perf_counter() - started, 3),
    }
    return head, report


def pseudo_labels(
    head: ClassifierHead, unlabeled: np.ndarray, share: float, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``unlabeled`` the head is surest of, and its guesses for them: per guessed class
    the ``share / k`` of the pool (and at most ``limit / k`` rows) with the highest probability,
    so a head biased towards one class does not fill the set with it.  Returns (rows, classes),
    rows ascending."""
    probs = head.probabilities(unlabeled)
    guessed = probs.argmax(axis=1)
    sure = probs.max(axis=1)
    k = max(1, probs.shape[1])
    per_class = int(len(unlabeled) * share / k)
    if limit is not None:
        per_class = min(per_class, limit // k)
    rows = []
    for c in range(probs.shape[1]):
        members = np.flatnonzero(guessed == c)
        rows.extend(members[np.argsort(-sure[members], kind="stable")[:per_class]].tolist())
    rows_arr = np.asarray(sorted(rows), dtype=np.int64)
    return rows_arr, guessed[rows_arr]


def _with_guesses(data: ControlData, texts: Sequence[str], classes: np.ndarray) -> ControlData:
    """``data``'s labels followed by ``texts`` labelled with the guessed ``classes``."""
    return ControlData(
        data.name, data.labels, False,
        list(data.texts) + list(texts),
        list(data.targets) + [(data.labels[c],) for c in classes],
    )


def _per_label(data: ControlData, classes: np.ndarray) -> dict[str, int]:
    """How many guesses went to each of ``data``'s labels."""
    return {label: int((classes == c).sum()) for c, label in enumerate(data.labels)}


def self_train_head(
    embeddings: np.ndarray,
    data: ControlData,
    unlabeled: np.ndarray,
    start: ClassifierHead,
    prior: ClassifierHead | None,
    args: TrainingArguments,
) -> tuple[ClassifierHead, dict]:
    """The fast head refit on the labels plus its own surest guesses on unlabeled embeddings.

    ``start`` (the fast head on the labels) labels the pool; the surest ``self_train_share``
    of it, balanced over the guessed classes, joins the labels and ``fit_head`` refits on
    both (its regulariser and temperature chosen on the union, as for the labels alone);
    ``self_train_rounds`` times, each round's head labelling the pool anew.  Single-label
    controls only.  The labels themselves are never replaced by guesses.
    """
    if data.multiple:
        raise ValueError("self-training covers single-label controls")
    started = time.perf_counter()
    x = np.asarray(embeddings, dtype=np.float32)
    pool = np.asarray(unlabeled, dtype=np.float32)
    head, report = start, {}
    rounds = []
    for _ in range(max(1, args.self_train_rounds)):
        rows, classes = pseudo_labels(head, pool, args.self_train_share)
        # the pseudo-labelled rows have no text here: fit_head reads embeddings and targets only
        union = _with_guesses(data, [""] * len(rows), classes)
        head, report = fit_head(np.concatenate([x, pool[rows]]), union, prior, args.seed)
        rounds.append({"pseudo_labels": int(len(rows)), "per_label": _per_label(data, classes)})
    # the guesses are the easy cases: a temperature fitted with them in the folds makes the head
    # overconfident (tests/test_self_training.py: expected calibration error 0.089 that way, 0.052 this
    # way), so it is fitted on the labels alone, each fold's model refit without that fold
    pooled_temperature = head.temperature
    if len(data) >= 8 and report.get("prior") != "kept":  # (kept: the prior as it was, its own temperature)
        k, dim = len(data.labels), x.shape[1]
        labels_y = data.target_array()
        logits = _out_of_fold_logits(
            torch.from_numpy(x), torch.from_numpy(labels_y), _fold_of(len(data), 4, args.seed),
            _prior_rows(prior, k, dim) if report["prior"] == "zero-shot" else torch.zeros(k, dim),
            report["l2"], False, always=(torch.from_numpy(pool[rows]), torch.from_numpy(classes.astype(np.int64))),
        )
        # never sharper than with the guesses: with a few labels every held-out one can come out right,
        # and the fit would then sharpen without bound
        head = replace(head, temperature=max(pooled_temperature, fit_temperature(logits.numpy(), labels_y, False)))
    return head, {
        "pool": int(len(pool)),
        "share": args.self_train_share,
        "rounds": rounds,
        "fit": report,
        "temperature": {"labels": round(head.temperature, 4), "labels_and_guesses": round(pooled_temperature, 4)},
        "seconds": round(time.perf_counter() - started, 3),
    }


def with_pseudo_labels(
    data: ControlData, head: ClassifierHead, unlabeled: np.ndarray, texts: Sequence[str], args: TrainingArguments
) -> tuple[ControlData, dict]:
    """``data`` plus the texts of ``unlabeled`` that ``head`` is surest of, labelled with its
    guesses (balanced over the guessed classes, as in :func:`pseudo_labels`): the
    ``self_train_tune_share`` of the pool, at most ``self_train_tune_max`` texts.  The full recipe
    fine-tunes the encoder on both.  Single-label controls only."""
    if data.multiple:
        raise ValueError("pseudo-labels cover single-label controls")
    if len(texts) != len(unlabeled):
        raise ValueError(f"{len(texts)} texts for {len(unlabeled)} embeddings")
    if not len(unlabeled) or args.self_train_tune_max <= 0:
        return data, {"pseudo_labels": 0}
    rows, classes = pseudo_labels(
        head, np.asarray(unlabeled, dtype=np.float32), args.self_train_tune_share, args.self_train_tune_max
    )
    union = _with_guesses(data, [texts[r] for r in rows], classes)
    return union, {"pseudo_labels": int(len(rows)), "per_label": _per_label(data, classes), "pool": int(len(unlabeled))}


# -- calibration and evaluation ------------------------------------------------------
def _nll(logits: np.ndarray, y: np.ndarray, multiple: bool) -> float:
    if multiple:
        p = 1.0 / (1.0 + np.exp(-logits))
        p = np.clip(p, 1e-7, 1 - 1e-7)
        return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(y)), y].mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray, multiple: bool) -> float:
    """The temperature T minimising the negative log-likelihood of ``logits / T``.

    Fitted on predictions for labels the logits' model did not train on (out-of-fold
    or a held-out split of the training labels), never on the evaluation slice.
    """
    if len(y) < 8:
        return 1.0
    # every prediction right: the likelihood only grows as T shrinks, to the grid's end (0.05),
    # and every score would read 0.999; nothing here says how sure to be, so no change
    if _score(torch.from_numpy(np.asarray(logits, dtype=np.float32)), torch.from_numpy(np.asarray(y)), multiple) == 1.0:
        return 1.0
    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 121))
    losses = [_nll(logits / t, y, multiple) for t in grid]
    return float(grid[int(np.argmin(losses))])


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """ECE of the top choice (single-label)."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(ece)


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denominator = 2 * tp + fp + fn
    return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 1.0)


def suggested_labels(probs: np.ndarray, threshold: float) -> np.ndarray:
    """The labels suggested for each row of several-labels-per-task probabilities, as served
    (``predictor.choices_result``): those at ``threshold``, else the likeliest one alone."""
    predicted = probs >= threshold
    empty = np.flatnonzero(~predicted.any(axis=1))
    predicted[empty, probs[empty].argmax(axis=1)] = True
    return predicted


def _micro_f1(predicted: np.ndarray, truth: np.ndarray) -> float:
    tp, fp, fn = (predicted & truth).sum(), (predicted & ~truth).sum(), (~predicted & truth).sum()
    return float(_f1(np.array([tp]), np.array([fp]), np.array([fn]))[0])


def evaluate(probs: np.ndarray, data: ControlData, head: ClassifierHead) -> dict:
    """Slice metrics of one control: accuracy and macro-F1 (single), micro/macro-F1 (multiple).

    ``primary`` is the figure the promotion gate compares: accuracy, or micro-F1.
    """
    y = data.target_array()
    k = len(data.labels)
    broken = int((~np.isfinite(probs)).any(axis=1).sum()) if len(probs) else 0
    if broken:  # a model whose numbers are not finite (diverged) is no candidate: argmax read NaN as label 0
        key = "micro_f1" if data.multiple else "accuracy"
        return {"n": int(len(y)), key: 0.0, "macro_f1": 0.0, "non_finite": broken, "primary": 0.0}
    if data.multiple:
        # as served: a row with no label at the threshold still gets its likeliest one suggested, so the
        # gate judges what annotators are shown
        predicted = suggested_labels(probs, head.threshold)
        truth = y.astype(bool)
        tp = (predicted & truth).sum(axis=0)
        fp = (predicted & ~truth).sum(axis=0)
        fn = (~predicted & truth).sum(axis=0)
        micro = _micro_f1(predicted, truth)
        present = truth.any(axis=0) | predicted.any(axis=0)  # a label neither true nor suggested: no figure
        return {
            "n": int(len(y)),
            "micro_f1": round(micro, 4),
            "macro_f1": round(float(_f1(tp, fp, fn)[present].mean()) if present.any() else 0.0, 4),
            "exact_match": round(float((predicted == truth).all(axis=1).mean()), 4),
            "primary": micro,
        }
    predicted = probs.argmax(axis=1)
    onehot_pred = np.eye(k, dtype=bool)[predicted]
    onehot_true = np.eye(k, dtype=bool)[y]
    tp = (onehot_pred & onehot_true).sum(axis=0)
    fp = (onehot_pred & ~onehot_true).sum(axis=0)
    fn = (~onehot_pred & onehot_true).sum(axis=0)
    present = onehot_true.any(axis=0) | onehot_pred.any(axis=0)
    accuracy = float((predicted == y).mean())
    return {
        "n": int(len(y)),
        "accuracy": round(accuracy, 4),
        "macro_f1": round(float(_f1(tp, fp, fn)[present].mean()) if present.any() else 0.0, 4),
        "ece": round(expected_calibration_error(probs, y), 4),
        "primary": accuracy,
    }


# -- full fine-tuning ----------------------------------------------------------------
def full_schedule(n_examples: int, args: TrainingArguments) -> tuple[int, int]:
    """(epochs, optimisation steps) for ``n_examples`` labels.

    epochs = ceil(target_examples / n) clamped to [3, max_epochs] (unless ``epochs`` is
    set); steps = ceil(n / batch_size) x epochs, at least ``min_steps``.
    """
    if n_examples <= 0:
        return 0, 0
    epochs = args.epochs or min(args.max_epochs, max(3, math.ceil(args.target_examples / n_examples)))
    steps = max(args.min_steps, math.ceil(n_examples / args.batch_size) * epochs)
    return epochs, steps


WARM_START_MIN_TEMPERATURE = 0.25


class _Heads(torch.nn.Module):
    def __init__(self, heads: dict[str, ClassifierHead]):
        super().__init__()
        self.layers = torch.nn.ModuleDict()
        for name, head in heads.items():
            layer = torch.nn.Linear(head.weight.shape[1], head.weight.shape[0])
            with torch.no_grad():
                # the served logits are (W e + b) / T: fold the temperature in, but never sharper than
                # WARM_START_MIN_TEMPERATURE: a temperature fitted on a few labels can reach the grid's 0.05
                # (16 AG News labels, self-trained head), and 20x logits saturate the softmax; one epoch
                # on 16 labels and 996 guesses then took 299 s against 47 s at 64 labels (T 0.67)
                temperature = max(head.temperature, WARM_START_MIN_TEMPERATURE)
                layer.weight.copy_(torch.from_numpy(head.weight / temperature))
                layer.bias.copy_(torch.from_numpy(head.bias / temperature))
            self.layers[name] = layer


def split_for_validation(data: ControlData, share: float, seed: int, minimum: int = 100) -> tuple[ControlData, ControlData | None]:
    """A seeded split of a control's training labels for early stopping and calibration
    (never the evaluation slice); none below ``minimum`` labels."""
    if len(data) < minimum or share <= 0:
        return data, None
    order = np.random.default_rng(seed).permutation(len(data))
    cut = max(8, int(round(len(data) * share)))
    held, kept = sorted(order[:cut]), sorted(order[cut:])

    def take(rows) -> ControlData:
        return ControlData(data.name, data.labels, data.multiple, [data.texts[i] for i in rows], [data.targets[i] for i in rows])

    return take(kept), take(held)


def balanced_weights(data: ControlData) -> np.ndarray | None:
    """Sampling weights that even out skewed single-label classes (max/min count > 3), else None."""
    if data.multiple or not len(data):
        return None
    y = data.target_array()
    counts = np.bincount(y, minlength=len(data.labels))
    present = counts[counts > 0]
    if present.max() <= 3 * present.min():
        return None
    weights = 1.0 / counts[y]
    return weights / weights.sum()


def pad_batch(seqs: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids padded to the batch's longest sequence, and the attention mask, on ``device``."""
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, seq in enumerate(seqs):
        input_ids[r, : len(seq)] = torch.tensor(seq)
        mask[r, : len(seq)] = 1
    return input_ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)


def training_copy(encoder: Encoder) -> Encoder:
    """A copy of ``encoder`` to train, on its device: float32 weights (a bf16 serving copy is
    reloaded), train mode, a lock of its own; ``encoder`` itself is left untouched."""
    import copy

    source = encoder.trainable()
    student = copy.copy(source)
    student.model = copy.deepcopy(source.model).to(encoder.device).train()
    student._lock = threading.Lock()
    return student


def encoder_groups(model: torch.nn.Module, learning_rate: float, weight_decay: float) -> list[dict]:
    """AdamW parameter groups of an encoder: weight decay on weight matrices, none on biases and
    LayerNorm."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or "LayerNorm" in name or "bias" in name else decay).append(param)
    return [
        {"params": decay, "lr": learning_rate, "weight_decay": weight_decay},
        {"params": no_decay, "lr": learning_rate, "weight_decay": 0.0},
    ]


def warmup_linear_decay(optimizer: torch.optim.Optimizer, steps: int, warmup_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_ratio`` of ``steps``, then linear decay to 0 at ``steps``."""
    warmup = max(1, int(steps * warmup_ratio))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (steps - step) / max(1, steps - warmup)))
    )


def fine_tune(
    encoder: Encoder,
    heads: dict[str, ClassifierHead],
    data: Sequence[ControlData],
    args: TrainingArguments,
    progress: Progress | None = None,
    validation: Sequence[ControlData | None] | None = None,
    patience: int = 3,
) -> tuple[Encoder, dict[str, ClassifierHead], dict]:
    """Fine-tune a copy of ``encoder`` together with ``heads`` (warm start from both).

    Batches are drawn per control (one shared encoder, one head each), shuffled with the
    seed (class-balanced where a single-label control is skewed); linear warm-up then
    linear decay; AdamW with weight decay; bf16 autocast on CUDA (fp16 with a gradient scaler where bf16 is missing).  With ``validation``
    (a held-out split of the training labels, one per control or None), each head's
    temperature is fitted on that split; where the split holds ``early_stopping_min``
    labels, the model is also checked once per epoch, the best state is kept, and training
    stops after ``patience`` checks without gain (a smaller split runs the whole schedule).
    Returns a new encoder object (the input one is left untouched), new heads, and a report.
    """
    set_seed(args.seed)
    device = encoder.device
    student = training_copy(encoder)
    head_module = _Heads({c.name: heads[c.name] for c in data}).to(device).train()

    batches: list[tuple[ControlData, list[int]]] = []
    total = sum(len(c) for c in data)
    epochs, steps = full_schedule(total, args)
    rng = random.Random(args.seed)
    targets = {c.name: torch.from_numpy(c.target_array()) for c in data}
    ids = {c.name: student.tokenize(c.texts, args.max_length) for c in data}

    weights = {c.name: balanced_weights(c) for c in data}
    sampler = np.random.default_rng(args.seed)

    def refill() -> None:
        for control in data:
            if weights[control.name] is not None:
                order = list(sampler.choice(len(control), size=len(control), p=weights[control.name]))
            else:
                order = list(range(len(control)))
                rng.shuffle(order)
            for start in range(0, len(order), args.batch_size):
                batches.append((control, order[start : start + args.batch_size]))
        rng.shuffle(batches)

    checks = [(c, v) for c, v in zip(data, validation or [None] * len(data)) if v is not None and len(v)]
    stop_early = sum(len(v) for _, v in checks) >= args.early_stopping_min
    steps_per_epoch = max(1, sum(math.ceil(len(c) / args.batch_size) for c in data))
    best = {"score": -1.0, "step": 0, "state": None}
    stale = 0

    def validate() -> float:
        student.model.eval()
        scores = []
        for control, held in checks:
            emb = torch.from_numpy(student.encode(held.texts, 64)).to(device)
            with torch.no_grad():
                logits = head_module.layers[control.name](emb).float().cpu().numpy()
            y = held.target_array()
            scores.append(_score(torch.from_numpy(logits), torch.from_numpy(y), control.multiple,
                                 heads[control.name].threshold))
        student.model.train()
        return float(np.mean(scores))

    optimizer = torch.optim.AdamW(
        encoder_groups(student.model, args.learning_rate, args.weight_decay)
        + [{"params": head_module.parameters(), "lr": args.head_learning_rate, "weight_decay": 0.0}]
    )
    scheduler = warmup_linear_decay(optimizer, steps, args.warmup_ratio)
    train_step = TrainingStep(device, optimizer, list(student.model.parameters()) + list(head_module.parameters()))
    pad = student.tokenizer.pad_token_id or 0
    started = time.perf_counter()
    losses: list[float] = []
    seen = 0
    diverged = None
    for step in range(steps):
        if not batches:
            refill()
        control, rows = batches.pop()
        input_ids, mask = pad_batch([ids[control.name][i] for i in rows], pad, device)
        y = targets[control.name][rows].to(device)
        with train_step.autocast():
            pooled = student.pooled(input_ids, mask)
            logits = head_module.layers[control.name](pooled).float()
        if control.multiple:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
        else:
            loss = torch.nn.functional.cross_entropy(logits, y, label_smoothing=args.label_smoothing)
        if not torch.isfinite(loss.detach()):  # diverged: what it has learned so far is all it will give
            log.warning("fine-tuning stopped at step %d: the loss is not finite", step + 1)
            diverged = step + 1
            break
        train_step(loss)
        scheduler.step()
        losses.append(float(loss.detach()))
        seen += len(rows)
        if checks and stop_early and ((step + 1) % steps_per_epoch == 0 or step == steps - 1):
            score = validate()
            if score > best["score"]:
                best.update(score=score, step=step + 1, state=_snapshot(student.model, head_module))
                stale = 0
            else:
                stale += 1
                if stale >= patience:
                    log.info("early stop at step %d: no gain on the validation split for %d checks", step + 1, stale)
                    break
        if progress and (step % 10 == 0 or step == steps - 1):
            progress({"stage": "fine-tune", "step": step + 1, "steps": steps, "loss": round(float(np.mean(losses[-10:])), 4)})
    elapsed = time.perf_counter() - started
    if best["state"] is not None:
        _restore(student.model, head_module, best["state"])
    student.model.eval()
    temperatures = {}
    for control, held in checks:
        emb = torch.from_numpy(student.encode(held.texts, 64)).to(device)
        with torch.no_grad():
            logits = head_module.layers[control.name](emb).float().cpu().numpy()
        temperatures[control.name] = fit_temperature(logits, held.target_array(), control.multiple)
    new_heads = {}
    for control in data:
        layer = head_module.layers[control.name]
        old = heads[control.name]
        new_heads[control.name] = ClassifierHead(
            labels=list(old.labels),
            weight=layer.weight.detach().float().cpu().numpy(),
            bias=layer.bias.detach().float().cpu().numpy(),
            multiple=old.multiple,
            temperature=temperatures.get(control.name, 1.0),
            threshold=old.threshold,
            trained=True,
            zero_shot_rows=[],
        )
    report = {
        "epochs": epochs,
        "steps": steps,
        "examples_seen": seen,
        "seconds": round(elapsed, 2),
        "examples_per_second": round(seen / elapsed, 1) if elapsed else None,
        "final_loss": round(float(np.mean(losses[-10:])), 4) if losses else None,
        "validation": {"size": sum(len(v) for _, v in checks), "early_stopping": stop_early,
                       "best_score": best["score"] if stop_early else None,
                       "best_step": best["step"] if stop_early else None},
        "temperature": {name: round(t, 4) for name, t in temperatures.items()},
        "balanced": sorted(name for name, w in weights.items() if w is not None),
    }
    if diverged is not None:
        report["diverged_at_step"] = diverged
    return student, new_heads, report


def average_students(
    first: Encoder,
    second: Encoder,
    first_heads: dict[str, ClassifierHead],
    second_heads: dict[str, ClassifierHead],
    validation: Sequence[ControlData | None] = (),
    weight: float = 0.5,
) -> tuple[Encoder, dict[str, ClassifierHead]]:
    """A weight average (a "model soup") of two students fine-tuned from the same start: ``weight``
    of ``first``'s encoder and head weights, the rest ``second``'s.  Two runs of the full recipe
    from one warm start stay in one basin, and their mean can sit nearer its middle than either: on
    all 256 SST-2 labels (seeds 0-2) the first round 0.789, the second 0.796, their average 0.803;
    trained outside a job's slice, 0.775, 0.793 and 0.788 (see the README).  Each head's temperature
    is fitted anew on its ``validation`` split (else 1)."""
    soup = training_copy(first)
    a, b = first.trainable().model.state_dict(), second.trainable().model.state_dict()
    soup.model.load_state_dict({
        name: (weight * a[name].float() + (1 - weight) * b[name].float()).to(a[name].dtype)
        if a[name].is_floating_point() else a[name]
        for name in a
    })
    soup.model.eval()
    checks = {c.name: c for c in validation if c is not None and len(c)}
    heads = {}
    for name, head in first_heads.items():
        other = second_heads[name]
        mixed = replace(head, weight=weight * head.weight + (1 - weight) * other.weight,
                        bias=weight * head.bias + (1 - weight) * other.bias, temperature=1.0)
        held = checks.get(name)
        if held is not None:
            logits = soup.encode(held.texts, 64) @ mixed.weight.T + mixed.bias
            mixed.temperature = fit_temperature(logits, held.target_array(), mixed.multiple)
        heads[name] = mixed
    return soup, heads


def contrastive_pairs(data: ControlData, rounds: int, cap: int, seed: int) -> list[tuple[int, int, float]]:
    """Pairs of one single-label control's examples: in each round every example, in a fresh
    random order, anchors one pair with an example of its own label (target 1) and one with an
    example of another label, that label drawn uniformly (target 0); at most ``cap`` pairs."""
    rng = random.Random(seed)
    labels = [t[0] for t in data.targets]
    members: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        members.setdefault(label, []).append(i)
    if len(members) < 2:
        return []
    pairs: list[tuple[int, int, float]] = []
    for _ in range(max(1, rounds)):
        for i in rng.sample(range(len(labels)), len(labels)):
            same = [j for j in members[labels[i]] if j != i]
            if same:
                pairs.append((i, rng.choice(same), 1.0))
            other = rng.choice([label for label in members if label != labels[i]])
            pairs.append((i, rng.choice(members[other]), 0.0))
            if len(pairs) >= cap:
                return pairs[:cap]
    return pairs


def contrastive_tune(
    encoder: Encoder,
    data: Sequence[ControlData],
    args: TrainingArguments,
    progress: Progress | None = None,
) -> tuple[Encoder | None, dict]:
    """Tune a copy of ``encoder`` so that texts of one label embed close together and texts of
    different labels apart (SetFit's recipe: pairs of labeled texts, the squared error between
    their cosine similarity and 1 or 0; AdamW, ``contrastive_learning_rate``, 10% warm-up, linear
    decay, one pass over the pairs).  Single-label controls only; returns ``(None, report)`` when
    none has two labels.  Heads are fitted afterwards on the tuned embeddings (``fit_head``)."""
    controls = [c for c in data if not c.multiple]
    pairs = [(c, p) for c in controls
             for p in contrastive_pairs(c, args.contrastive_rounds, args.contrastive_pairs, args.seed)]
    if not pairs or not args.contrastive_pairs:
        return None, {"pairs": 0}
    set_seed(args.seed)
    random.Random(args.seed).shuffle(pairs)
    device = encoder.device
    student = training_copy(encoder)
    ids = {c.name: student.tokenize(c.texts, args.max_length) for c in controls}
    pad = student.tokenizer.pad_token_id or 0
    steps = math.ceil(len(pairs) / args.batch_size)
    optimizer = torch.optim.AdamW(encoder_groups(student.model, args.contrastive_learning_rate, args.weight_decay))
    scheduler = warmup_linear_decay(optimizer, steps, args.warmup_ratio)
    train_step = TrainingStep(device, optimizer, student.model.parameters())

    started = time.perf_counter()
    losses: list[float] = []
    diverged = None
    for step in range(steps):
        chunk = pairs[step * args.batch_size : (step + 1) * args.batch_size]
        left = pad_batch([ids[c.name][i] for c, (i, _, _) in chunk], pad, device)
        right = pad_batch([ids[c.name][j] for c, (_, j, _) in chunk], pad, device)
        target = torch.tensor([y for _, (_, _, y) in chunk], device=device)
        with train_step.autocast():
            similarity = (student.pooled(*left) * student.pooled(*right)).sum(dim=-1).float()
        loss = torch.nn.functional.mse_loss(similarity, target)
        if not torch.isfinite(loss.detach()):  # diverged: what it has learned so far is all it will give
            log.warning("contrastive tuning stopped at step %d: the loss is not finite", step + 1)
            diverged = step + 1
            break
        train_step(loss)
        scheduler.step()
        losses.append(float(loss.detach()))
        if progress and (step % 10 == 0 or step == steps - 1):
            progress({"stage": "contrastive", "step": step + 1, "steps": steps, "loss": round(float(np.mean(losses[-10:])), 4)})
    student.model.eval()
    elapsed = time.perf_counter() - started
    return student, {
        "pairs": len(pairs),
        "steps": steps,
        "seconds": round(elapsed, 2),
        "pairs_per_second": round(len(pairs) / elapsed, 1) if elapsed else None,
        "final_loss": round(float(np.mean(losses[-10:])), 4) if losses else None,
        **({"diverged_at_step": diverged} if diverged is not None else {}),
    }


def _snapshot(model: torch.nn.Module, heads: torch.nn.Module) -> tuple[dict, dict]:
    return (
        {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
        {k: v.detach().to("cpu", copy=True) for k, v in heads.state_dict().items()},
    )


def _restore(model: torch.nn.Module, heads: torch.nn.Module, state: tuple[dict, dict]) -> None:
    model.load_state_dict(state[0])
    heads.load_state_dict(state[1])


def save_encoder(encoder: Encoder, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    encoder.model.save_pretrained(str(folder), safe_serialization=True)
    encoder.tokenizer.save_pretrained(str(folder))
