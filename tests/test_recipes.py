"""The fast head, the adaptive full recipe and the automatic choice between them."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from ls_backend.embeddings import EmbeddingCache
from ls_backend.finetune import FineTuneJob
from ls_backend.jobs import FAST, FULL, EmbeddedTrainingQueue
from ls_backend.registry import ModelRegistry
from ls_backend.settings import Settings
from ls_backend.store import CorrectionStore
from ls_backend.trainer import ControlData, balanced_weights, fit_head, split_for_validation

from .support.data import AGNEWS_LABELS, sst2
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
    assert refit < reencode, (refit, reencode)
    assert refit < 15.0, refit  # generous; about a second when the machine is quiet
    assert head.trained and report["cv_accuracy"] > 0.6


def test_validation_split_and_class_balance_rules():
    small = ControlData("c", ["a", "b"], False, ["x"] * 20, [("a",)] * 20)
    assert split_for_validation(small, 0.15, 1) == (small, None)  # too few labels to hold any out
    big = ControlData("c", ["a", "b"], False, [f"t{i}" for i in range(100)], [("a",) if i % 10 else ("b",) for i in range(100)])
    kept, held = split_for_validation(big, 0.15, 1)
    assert len(held) == 15 and len(kept) == 85 and not set(held.texts) & set(kept.texts)
    weights = balanced_weights(big)  # 90 a vs 10 b: skewed
    assert weights is not None and weights[0] == pytest.approx(weights[0])
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
    scores = {name: meta["metrics"][name]["score"] for name in ("frozen", "full")}
    assert set(meta["training"]) == {"frozen", "full"}  # both candidates trained and measured
    assert meta["training"]["full"]["steps"] >= 12
    assert result["recipe"] == max(scores, key=lambda name: (scores[name], name == "frozen"))
    assert meta["metrics"][result["recipe"]]["score"] >= max(scores.values())
    if result["promoted"]:
        assert meta["metrics"][result["recipe"]]["score"] + settings.promotion_tolerance >= meta["metrics"]["current"]["score"]
