"""The fast head, the adaptive full recipe and the automatic choice between them."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch
import pytest

from ls_backend.embeddings import EmbeddingCache
from ls_backend.finetune import FineTuneJob, slice_tolerance
from ls_backend.jobs import FAST, FULL, EmbeddedTrainingQueue
from ls_backend.registry import ModelRegistry
from ls_backend.settings import Settings
from ls_backend.store import CorrectionStore
from ls_backend.trainer import (
    ControlData,
    TrainingArguments,
    balanced_weights,
    contrastive_pairs,
    contrastive_tune,
    fine_tune,
    fit_head,
    split_for_validation,
)

from .support.data import AGNEWS_LABELS, agnews, sst2
from .support.events import annotation_event, choices, key_of, project
from .support.loop import balanced_agnews

SENTIMENT = """<View><Text name="text" value="$text"/>
  <Choices name="sentiment" toName="text"><Choice value="Negative"/><Choice value="Positive"/></Choices></View>"""


def test_fast_head_refits_in_seconds_from_cached_embeddings(tmp_path, encoder):
    rows = balanced_agnews(125)  # 500 labels
    texts = [t for _, t, _ in rows]
    data = ControlData("topic", AGNEWS_LABELS, False, texts, [(label,) for _, _, label in rows])
    cache = EmbeddingCache(tmp_path)
    started = time.perf_counter()
    _, misses = cache.encode(encoder, "base", texts)
    reencode = time.perf_counter() - started  # the baseline: what a refit costs without the cache
    assert misses == 500
    started = time.perf_counter()
    embeddings, misses = cache.encode(encoder, "base", texts)
    head, report = fit_head(embeddings, data, prior=None)
    refit = time.perf_counter() - started
    assert misses == 0
    assert refit < reencode, (refit, reencode)  # the same-run baseline, no wall-clock bound
    assert head.trained and report["cv_accuracy"] > 0.6


def test_validation_split_and_class_balance_rules():
    small = ControlData("c", ["a", "b"], False, ["x"] * 20, [("a",)] * 20)
    assert split_for_validation(small, 0.15, 1) == (small, None)  # too few labels to hold any out
    big = ControlData("c", ["a", "b"], False, [f"t{i}" for i in range(100)], [("a",) if i % 10 else ("b",) for i in range(100)])
    kept, held = split_for_validation(big, 0.15, 1)
    assert len(held) == 15 and len(kept) == 85 and not set(held.texts) & set(kept.texts)
    weights = balanced_weights(big)  # 90 a vs 10 b: skewed
    assert weights is not None and weights.sum() == pytest.approx(1.0)
    rare = np.array([t == ("b",) for t in big.targets])
    assert weights[rare].sum() == pytest.approx(weights[~rare].sum())  # each class drawn as often
    assert weights[big.texts.index("t0")] > weights[big.texts.index("t1")]  # the rare class weighs more
    assert balanced_weights(ControlData("c", ["a", "b"], False, ["x", "y"], [("a",), ("b",)])) is None


def test_label_triggers_feed_the_fast_lane_and_the_full_lane_once_large(tmp_path):
    settings = Settings(model_dir=tmp_path, train_every=1, train_mode="auto", full_min_labels=3)
    store = CorrectionStore.from_settings(settings)
    queue = EmbeddedTrainingQueue(settings)
    try:
        for n in range(4):
            outcome = store.record_event(annotation_event(n + 1, n + 1, choices("World")))
            queue.maybe_enqueue(store, outcome)
            lanes = sorted(job.lane for job in queue.jobs(outcome.project_key))
            assert lanes == ([FAST] if n + 1 < 3 else [FAST, FULL]), (n, lanes)
        start = store.record_event({"action": "START_TRAINING", "project": project()})
        job = queue.maybe_enqueue(store, start)
        assert job.lane == FULL  # the button always asks for the full recipe (coalesced here)
    finally:
        store.close()


def test_auto_promotes_the_best_candidate_on_sst2(tmp_path):
    settings = Settings(
        model_dir=tmp_path / "models",
        max_length=64,
        train_max_length=64,
        train_mode="auto",
        full_min_labels=0,
        train_epochs=1,
        train_min_steps=12,
        eval_min=10,
        contrastive_pairs=192,
    )
    store = CorrectionStore.from_settings(settings)
    proj = project(5, SENTIMENT)
    try:
        for n, (text, label) in enumerate(sst2("train", 120, min_words=6)):
            event = annotation_event(n + 1, n + 1, choices("Positive" if label else "Negative", control="sentiment"), text=text, proj=proj)
            store.record_event(event)
        result = FineTuneJob(settings, store).run(key_of(5))
    finally:
        store.close()
    meta = ModelRegistry(settings.model_dir).meta(key_of(5), result["version"])
    scores = {name: meta["metrics"][name]["score"] for name in ("frozen", "full", "contrastive")}
    assert set(meta["training"]) == {"frozen", "full", "contrastive"}  # every candidate trained and measured
    assert meta["training"]["full"]["steps"] >= 12
    assert meta["training"]["contrastive"]["pairs"] == 192 and meta["training"]["contrastive"]["steps"] == 12
    assert result["recipe"] == max(scores, key=lambda name: (scores[name], name == "frozen"))
    assert meta["metrics"][result["recipe"]]["score"] >= max(scores.values())
    # the gate, as documented: promoted exactly when the best is at most the slice's tolerance below the current
    held = min(part["eval"] for part in meta["data"].values())
    tolerance = slice_tolerance(settings, held)
    best, current = meta["metrics"][result["recipe"]]["score"], meta["metrics"]["current"]["score"]
    assert result["promoted"] == (best + tolerance >= current - 1e-9), (best, current, tolerance)
    assert result["promoted"]  # 120 SST-2 labels beat the zero-shot start on this slice


def test_contrastive_pairs_are_balanced_capped_and_reproducible():
    data = ControlData("c", ["a", "b", "c"], False, [f"t{i}" for i in range(30)], [(("a", "b", "c")[i % 3],) for i in range(30)])
    pairs = contrastive_pairs(data, rounds=4, cap=10_000, seed=1)
    assert len(pairs) == 4 * 30 * 2  # one same-label and one other-label pair per example and round
    labels = [t[0] for t in data.targets]
    assert all((labels[i] == labels[j]) == (y == 1.0) and i != j for i, j, y in pairs)
    assert sum(y for _, _, y in pairs) == len(pairs) / 2
    assert contrastive_pairs(data, 4, 10_000, 1) == pairs and contrastive_pairs(data, 4, 10_000, 2) != pairs
    assert len(contrastive_pairs(data, 20, 100, 1)) == 100
    one_label = ControlData("c", ["a", "b"], False, ["x", "y"], [("a",), ("a",)])
    assert contrastive_pairs(one_label, 4, 100, 1) == []  # nothing to contrast


def test_contrastive_tuning_pulls_same_topic_texts_together(encoder):
    """After a few hundred pairs of 32 AG News labels, unseen test texts of one topic sit closer
    together (relative to texts of other topics) than with the base encoder."""
    train = agnews("dev", 400)[:32]
    data = ControlData("topic", AGNEWS_LABELS, False, [t for t, _ in train], [(y,) for _, y in train])
    args = TrainingArguments(max_length=64, contrastive_pairs=320, contrastive_learning_rate=5e-5, seed=3)
    first = next(encoder.model.parameters()).detach().clone()
    updates: list[dict] = []
    tuned, report = contrastive_tune(encoder, [data], args, updates.append)
    assert report["pairs"] == 320 and report["steps"] == 20
    losses = [u["loss"] for u in updates if u["stage"] == "contrastive"]
    assert losses[-1] < losses[0], losses
    test = agnews("test", 200, offset=500)
    y = np.array([AGNEWS_LABELS.index(label) for _, label in test])
    same = y[:, None] == y[None, :]
    off_diagonal = ~np.eye(len(y), dtype=bool)

    def gap(model) -> float:
        e = model.encode([t for t, _ in test])
        sim = e @ e.T
        return float(sim[same & off_diagonal].mean() - sim[~same].mean())

    before, after = gap(encoder), gap(tuned)
    assert after > 1.15 * before, (after, before)  # base encoder: about 0.07
    assert torch.equal(next(encoder.model.parameters()), first)  # the encoder handed in is left as it was


def test_early_stopping_only_on_a_validation_split_large_enough_to_trust(encoder):
    rows = balanced_agnews(8)  # 32 labels
    texts = [t for _, t, _ in rows]
    data = ControlData("topic", AGNEWS_LABELS, False, texts, [(label,) for _, _, label in rows])
    # validation: the same texts, each with another topic, so every epoch of training on the
    # real topics can only make it worse: the first check is the best one
    wrong = ControlData("topic", AGNEWS_LABELS, False, texts,
                        [(AGNEWS_LABELS[(AGNEWS_LABELS.index(label) + 1) % 4],) for _, _, label in rows])
    head, _ = fit_head(encoder.encode(texts), data, None)
    args = TrainingArguments(epochs=5, min_steps=1, batch_size=8, max_length=32, early_stopping_min=32)
    _, _, trusted = fine_tune(encoder, {"topic": head}, [data], args, validation=[wrong], patience=1)
    assert trusted["validation"]["early_stopping"] and trusted["validation"]["best_step"] == 4
    assert trusted["examples_seen"] == 2 * 32  # stopped at the second check, one without gain
    _, _, small = fine_tune(encoder, {"topic": head}, [data], replace(args, early_stopping_min=33),
                            validation=[wrong], patience=1)
    assert not small["validation"]["early_stopping"] and small["validation"]["best_step"] is None
    assert small["examples_seen"] == 5 * 32 and small["steps"] == 20  # the whole schedule
    assert small["temperature"]["topic"] != 1.0  # the split still calibrates


def test_label_smoothing_keeps_the_tuned_head_from_driving_its_labels_to_certainty(encoder):
    """The full recipe trains on the fast head's guesses as well as the labels; a hard target of 1.0
    on each guess teaches its errors. With LABEL_SMOOTHING (0.1, the default) the cross-entropy's
    optimum on a training text is 0.925 for its label, not 1.0."""
    from ls_backend.finetune import training_arguments

    assert training_arguments(Settings()).label_smoothing == 0.1
    assert training_arguments(Settings.from_env({"LABEL_SMOOTHING": "0"})).label_smoothing == 0.0
    rows = balanced_agnews(8)
    texts = [t for _, t, _ in rows]
    data = ControlData("topic", AGNEWS_LABELS, False, texts, [(label,) for _, _, label in rows])
    head, _ = fit_head(encoder.encode(texts), data, None)
    args = TrainingArguments(epochs=10, min_steps=1, batch_size=8, max_length=32)

    def surest(smoothing: float) -> float:
        student, heads, _ = fine_tune(encoder, {"topic": head}, [data], replace(args, label_smoothing=smoothing))
        return float(heads["topic"].probabilities(student.encode(texts)).max(axis=1).mean())

    hard, smooth = surest(0.0), surest(0.1)
    assert hard > 0.98 and smooth < 0.96


def test_a_warm_start_folds_the_temperature_in_but_never_sharper_than_the_floor():
    from ls_backend.model import ClassifierHead
    from ls_backend.trainer import WARM_START_MIN_TEMPERATURE, _Heads

    w = np.arange(12, dtype=np.float32).reshape(2, 6) / 10
    b = np.array([0.5, -0.5], dtype=np.float32)
    for temperature, folded in ((2.0, 2.0), (0.5, 0.5), (0.05, WARM_START_MIN_TEMPERATURE)):
        # a temperature fitted on 16 labels reached 0.05: folded in whole, it made logits 20x and one
        # epoch of the full recipe 6x slower, with a loss that barely moved
        layer = _Heads({"c": ClassifierHead(["a", "b"], w, b, temperature=temperature)}).layers["c"]
        assert torch.allclose(layer.weight, torch.from_numpy(w / folded))
        assert torch.allclose(layer.bias, torch.from_numpy(b / folded))


def test_with_a_handful_of_labels_the_fast_head_does_not_fall_below_the_zero_shot_head(encoder):
    """The first fast-lane job (about 8 labels with TRAIN_EVERY=10) is promoted without a slice to
    judge it on: its head scored 0.55 on average against the zero-shot head's 0.65, and now and
    then gave every task one label (a free bias set to a few labels' frequencies, a temperature
    run to the grid's end).  Over draws of 8 labels, it now holds the zero-shot level."""
    from ls_backend.labeling import plan_for
    from ls_backend.model import zero_shot_head

    topic = """<View><Text name="text" value="$text"/><Choices name="topic" toName="text">
      <Choice value="World"/><Choice value="Sports"/><Choice value="Business"/><Choice value="Sci/Tech"/></Choices></View>"""
    prior = zero_shot_head(plan_for(topic).controls[0], encoder, "{label}", 0.05, 0.5)
    pool, test = agnews("dev", 600), agnews("test", 400)
    pool_x, test_x = encoder.encode([t for t, _ in pool]), encoder.encode([t for t, _ in test])
    gold = np.array([AGNEWS_LABELS.index(label) for _, label in test])
    zero_shot = float((prior.probabilities(test_x).argmax(axis=1) == gold).mean())
    accuracies, kept = [], 0
    for seed in range(12):
        picked = np.random.default_rng(seed).choice(len(pool), 8, replace=False)
        data = ControlData("topic", AGNEWS_LABELS, False, [pool[i][0] for i in picked], [(pool[i][1],) for i in picked])
        head, report = fit_head(pool_x[picked], data, prior, seed=13)
        predicted = head.probabilities(test_x).argmax(axis=1)
        accuracies.append(float((predicted == gold).mean()))
        assert np.bincount(predicted, minlength=4).max() < 0.9 * len(gold), (seed, report)  # never one label for all
        if report["prior"] == "kept":
            assert head is prior and not head.trained
            kept += 1
        else:
            assert head.trained and head.temperature == 1.0  # a label with fewer examples than folds: not fitted
    assert np.mean(accuracies) >= zero_shot - 0.03, (np.mean(accuracies), zero_shot, accuracies)
    assert 0 < kept < 12  # a real choice each time, not a rule that always keeps or never does
    # a trained prior (a model fitted on some of these labels) never competes as it is
    trained = replace(prior, trained=True)
    head, report = fit_head(pool_x[:8], ControlData("topic", AGNEWS_LABELS, False, [t for t, _ in pool[:8]],
                                                    [(label,) for _, label in pool[:8]]), trained, seed=13)
    assert report["prior"] != "kept" and head is not trained


def test_the_bias_is_pulled_towards_the_prior_and_a_flawless_fit_leaves_the_temperature_alone():
    from ls_backend.trainer import _fit_linear, fit_temperature

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(12, 5)).astype(np.float32))
    y = torch.tensor([0] * 9 + [1] * 2 + [2])  # skewed counts: a free bias learns their frequencies
    prior_w, prior_b = torch.zeros(3, 5), torch.zeros(3)
    _, loose = _fit_linear(x, y, prior_w, prior_b, 1e-4, False)
    _, pulled = _fit_linear(x, y, prior_w, prior_b, 10.0, False)
    assert float(loose.abs().max()) > 0.5 and float(pulled.abs().max()) < 0.05
    logits = np.eye(3)[[0, 1, 2] * 4] * 3.0  # every prediction right
    assert fit_temperature(logits, np.array([0, 1, 2] * 4), False) == 1.0
    assert fit_temperature(logits, np.array([0, 1, 2] * 3 + [1, 2, 0]), False) != 1.0  # three wrong: fitted


# -- what training and the gate measure ----------------------------------------------------------
def test_the_fast_heads_own_figure_for_several_labels_is_the_gates_micro_f1_as_served():
    """Cross-validation, the kept-prior check and early stopping scored several labels per task by
    exact match at p >= 0.5 (a row without any label: wrong), while the gate and annotators see
    micro-F1 at the head's threshold with the likeliest label where none reaches it: the head's
    setting was chosen by another figure than the one served (0.775 micro-F1 against 0.843)."""
    from ls_backend.model import ClassifierHead
    from ls_backend.trainer import _score, evaluate

    rng = np.random.default_rng(0)
    for threshold in (0.3, 0.5, 0.7):
        logits = rng.normal(-1.0, 2.0, size=(40, 5)).astype(np.float32)
        y = (rng.random((40, 5)) < 0.3).astype(np.float32)
        y[np.flatnonzero(~y.any(axis=1)), 0] = 1.0
        labels = list("abcde")
        data = ControlData("tags", labels, True, ["t"] * 40,
                           [tuple(labels[j] for j in np.flatnonzero(row)) for row in y])
        head = ClassifierHead(labels=labels, weight=np.zeros((5, 2), np.float32), bias=np.zeros(5, np.float32),
                              multiple=True, threshold=threshold)
        served = evaluate(1 / (1 + np.exp(-logits)), data, head)["primary"]
        assert _score(torch.from_numpy(logits), torch.from_numpy(y), True, threshold) == pytest.approx(served, abs=1e-6)
    single = rng.normal(size=(30, 3)).astype(np.float32)
    truth = rng.integers(0, 3, 30)
    assert _score(torch.from_numpy(single), torch.from_numpy(truth), False) == pytest.approx((single.argmax(1) == truth).mean())


def test_a_configured_label_nobody_used_does_not_keep_the_fast_head_uncalibrated(encoder):
    """The temperature is fitted out-of-fold only where every label has an example in each fold; an
    "Other" no annotator ever picked counted, and every head stayed at temperature 1."""
    rows = agnews("dev", 200)
    x = encoder.encode([t for t, _ in rows])
    plain = ControlData("topic", AGNEWS_LABELS, False, [t for t, _ in rows], [(g,) for _, g in rows])
    with_other = replace(plain, labels=AGNEWS_LABELS + ["Other"])
    _, fitted = fit_head(x, plain, None, 13)
    _, other = fit_head(x, with_other, None, 13)
    assert fitted["temperature"] != 1.0
    assert other["temperature"] != 1.0 and abs(other["temperature"] - fitted["temperature"]) < 0.2, (fitted, other)


def test_a_model_whose_numbers_are_not_finite_scores_nothing_and_training_stops_where_the_loss_does(encoder):
    """argmax reads NaN as the first label: a NaN head scored the share of that label on the slice and
    passed the gate against a current model no better; and fine-tuning went on past a loss of NaN."""
    from ls_backend.model import ClassifierHead
    from ls_backend.trainer import evaluate

    data = ControlData("c", ["pos", "neg"], False, ["a", "b", "c", "d"], [("pos",)] * 4)
    head = ClassifierHead(labels=["pos", "neg"], weight=np.zeros((2, 2), np.float32), bias=np.zeros(2, np.float32))
    figures = evaluate(np.full((4, 2), np.nan), data, head)
    assert figures["primary"] == 0.0 and figures["non_finite"] == 4
    texts = ["good movie", "bad movie", "great film", "awful film"] * 4
    sentiment = ControlData("c", ["pos", "neg"], False, texts, [("pos",), ("neg",)] * 8)
    start, _ = fit_head(encoder.encode(texts), sentiment, None)
    args = TrainingArguments(learning_rate=1e8, head_learning_rate=1e8, min_steps=20, max_length=64)
    _, heads, report = fine_tune(encoder, {"c": start}, [sentiment], args)
    assert report["diverged_at_step"] < 20 and np.isfinite(heads["c"].weight).all()
