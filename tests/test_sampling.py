"""Score modes order tasks as documented; query strategies; the candidate pool and GET /projects/<key>/next."""

from __future__ import annotations

import json
import math
import shutil
import time
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import assume, given, strategies as st

from ls_backend.registry import ModelRegistry
from ls_backend.sampling import (
    SCORE_MODES,
    CoverageSampling,
    DiverseUncertainty,
    NoPool,
    Pool,
    PoolPart,
    PoolStore,
    RandomSampling,
    TypicalCoverage,
    UncertaintySampling,
    covered_embeddings,
    mode_scores,
    next_batch,
)
from ls_backend.settings import Settings, SettingsError

from .conftest import TOPIC_CONFIG

PROJECT = "5.1732665262"


def distribution(k_min: int = 2, k_max: int = 8):
    """A probability vector over 2..8 labels (some entries may be 0)."""
    return st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=k_min, max_size=k_max).filter(
        lambda w: sum(w) > 1e-3
    ).map(lambda w: np.asarray(w) / np.sum(w))


def score(p, mode, multiple=False):
    return float(mode_scores(np.asarray(p)[None, :], mode, multiple)[0])


# -- score modes: the documented values -----------------------------------------------------
@given(distribution())
def test_single_choice_scores_are_the_documented_formulas(p):
    top = np.sort(p)[::-1]
    assert score(p, "confidence") == pytest.approx(top[0])
    assert score(p, "least_confidence") == pytest.approx(top[0])
    assert score(p, "margin") == pytest.approx(top[0] - top[1])
    entropy = -sum(x * math.log(x) for x in p if x > 0)
    assert score(p, "entropy") == pytest.approx(1 - entropy / math.log(len(p)), abs=1e-9)


@given(distribution(), st.sampled_from(SCORE_MODES), st.randoms())
def test_scores_lie_in_0_1_and_ignore_label_order(p, mode, random):
    s = score(p, mode)
    assert -1e-12 <= s <= 1 + 1e-12
    shuffled = list(p)
    random.shuffle(shuffled)
    assert score(shuffled, mode) == pytest.approx(s, abs=1e-12)


@given(st.integers(2, 10), st.integers(0, 9), st.sampled_from(SCORE_MODES))
def test_a_uniform_guess_sorts_first_and_a_certain_one_last(k, hot, mode):
    uniform, certain = np.full(k, 1.0 / k), np.eye(k)[hot % k]
    lowest = {"confidence": 1.0 / k, "least_confidence": 1.0 / k, "margin": 0.0, "entropy": 0.0}[mode]
    assert score(uniform, mode) == pytest.approx(lowest, abs=1e-9)
    assert score(certain, mode) == pytest.approx(1.0)


@given(distribution(3), st.floats(0.01, 1.0), st.sampled_from(SCORE_MODES))
def test_moving_belief_to_the_top_label_never_makes_a_task_sort_earlier(p, share, mode):
    """Taking mass from a weaker label and giving it to the top one makes the model surer:
    its score may only rise (entropy is Schur-concave; p1 rises; p1 - p2 rises)."""
    order = np.argsort(-p)
    top, weak = order[0], order[-1]
    assume(p[weak] > 1e-6)
    surer = p.copy()
    moved = p[weak] * share
    surer[weak] -= moved
    surer[top] += moved
    assert score(surer, mode) >= score(p, mode) - 1e-9


@given(st.lists(distribution(4, 4), min_size=2, max_size=30), st.sampled_from(SCORE_MODES))
def test_sorting_ascending_serves_the_most_uncertain_first(rows, mode):
    """The documented orders: ascending score = descending uncertainty of the mode."""
    p = np.stack(rows)
    scores = mode_scores(p, mode)
    top = -np.sort(-p, axis=1)
    if mode in ("confidence", "least_confidence"):
        uncertainty = 1 - top[:, 0]
    elif mode == "margin":
        uncertainty = -(top[:, 0] - top[:, 1])
    else:
        uncertainty = -(p * np.log(np.clip(p, 1e-300, 1))).sum(axis=1)
    ascending = np.argsort(scores, kind="stable")
    assert np.all(np.diff(uncertainty[ascending]) <= 1e-9)


@given(st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=6), st.sampled_from(SCORE_MODES))
def test_multiple_choice_scores(p, mode):
    p = np.asarray(p)
    s = score(p, mode, multiple=True)
    assert -1e-12 <= s <= 1 + 1e-12
    assert score(np.full(len(p), 0.5), mode, multiple=True) == pytest.approx(
        0.5 ** len(p) if mode in ("least_confidence", "confidence") else 0.0, abs=1e-9
    )
    if mode != "confidence":  # (confidence scores the suggestion: none above the threshold is unsure)
        assert score(np.round(p), mode, multiple=True) == pytest.approx(1.0)  # a decided vector is surest
    if mode == "least_confidence":
        assert s == pytest.approx(np.prod(np.maximum(p, 1 - p)))
    if mode == "margin":
        assert s == pytest.approx(np.min(np.abs(2 * p - 1)))
    if mode == "entropy":  # 1 - the mean binary entropy of the labels, in bits (the README's formula)
        q = np.clip(p, 1e-12, 1 - 1e-12)
        bits = -(q * np.log2(q) + (1 - q) * np.log2(1 - q))
        assert s == pytest.approx(max(0.0, 1 - bits.mean()), abs=1e-9)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_multiple_choice_confidence_is_the_probability_of_the_suggested_set_and_matches_the_result(threshold):
    from ls_backend.model import ClassifierHead
    from ls_backend.predictor import choices_result

    rng = np.random.default_rng(0)
    p = rng.uniform(size=(200, 3))
    scores = mode_scores(p, "confidence", multiple=True, threshold=threshold)
    head = ClassifierHead(["a", "b", "c"], np.zeros((3, 4)), np.zeros(3), multiple=True, threshold=threshold)
    for row, s in zip(p, scores):
        picked = row >= threshold
        expected = np.prod(np.where(picked, row, 1 - row)) if picked.any() else row.max()
        assert s == pytest.approx(expected)
        result, served = choices_result(SimpleNamespace(name="c", to_name="t"), head, row)
        assert served == pytest.approx(s)  # the score written to Label Studio is the one /next ranks by


def test_score_mode_setting():
    assert Settings.from_env({}).score_mode == "confidence"
    assert Settings.from_env({"SCORE_MODE": "Margin"}).score_mode == "margin"
    with pytest.raises(SettingsError, match="SCORE_MODE"):
        Settings.from_env({"SCORE_MODE": "bald"})
    assert Settings.from_env({"REFRESH_MAX_TASKS": "0"}).refresh_max_tasks == 0


@pytest.mark.parametrize("mode", ["margin", "entropy"])
def test_predictor_writes_the_mode_as_task_score_and_keeps_item_confidence(tmp_path, encoder, mode):
    from ls_backend.predictor import Predictor

    settings = Settings(model_dir=tmp_path / "models", max_length=128, score_mode=mode)
    predictor = Predictor(settings, encoder=encoder)
    texts = ["Stocks fell as oil rose", "The striker scored twice", "A new chip from Intel"]
    tasks = [{"id": i, "data": {"text": t}} for i, t in enumerate(texts)]
    predictor.setup(PROJECT, TOPIC_CONFIG)
    from ls_backend.labeling import plan_for

    serving = predictor._current_serving(PROJECT)
    keep: dict = {}
    results = predictor.predict_with(serving, plan_for(TOPIC_CONFIG), tasks, PROJECT, keep=keep)
    for i, entry in enumerate(results):
        probs = keep["probabilities"]["topic"][i]
        assert entry["result"][0]["score"] == pytest.approx(probs.max(), abs=1e-6)
        assert entry["score"] == pytest.approx(score(probs, mode), abs=1e-6)


# -- strategies ---------------------------------------------------------------------------
def blobs(rng, centres: int = 5, per: int = 40, dim: int = 16):
    means = np.eye(dim)[:centres] * 3
    x = np.concatenate([m + 0.1 * rng.standard_normal((per, dim)) for m in means])
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), np.repeat(np.arange(centres), per)


def test_uncertainty_random_and_bounds():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(4), size=50)
    picked = UncertaintySampling("margin").query(p, None, 5, rng)
    margins = mode_scores(p, "margin")
    assert set(picked) == set(np.argsort(margins)[:5])
    assert list(picked) == sorted(picked, key=lambda i: margins[i])
    chosen = RandomSampling().query(p, np.zeros((50, 3)), 10, rng)
    assert len(set(chosen)) == 10
    assert len(UncertaintySampling().query(p, None, 500, rng)) == 50
    assert len(CoverageSampling().query(None, np.zeros((0, 3)), 5, rng)) == 0


def test_coverage_takes_one_of_each_cluster():
    rng = np.random.default_rng(1)
    x, cluster = blobs(rng)
    picked = CoverageSampling().query(None, x, 5, np.random.default_rng(2))
    assert sorted(cluster[picked]) == [0, 1, 2, 3, 4]


def test_diverse_uncertainty_spreads_over_the_uncertain_candidates():
    rng = np.random.default_rng(3)
    x, cluster = blobs(rng)
    p = 0.5 * np.eye(4)[rng.integers(4, size=len(x))] + 0.5 * rng.dirichlet(np.ones(4), size=len(x))
    p[cluster == 0] = [0.26, 0.25, 0.25, 0.24]  # one cluster of near-duplicates is most uncertain
    top = UncertaintySampling().query(p, x, 5, rng)
    assert set(cluster[top]) == {0}
    diverse = DiverseUncertainty(candidates=10).query(p, x, 5, np.random.default_rng(4))
    assert len(set(diverse)) == 5 and len(set(cluster[diverse])) >= 3 and (cluster[diverse] == 0).sum() <= 2
    candidates = set(np.argsort(mode_scores(p, "confidence"), kind="stable")[:50])
    assert set(diverse) <= candidates


def test_typical_coverage_takes_typical_members_of_the_clusters_no_label_covers():
    rng = np.random.default_rng(5)
    x, cluster = blobs(rng)  # 5 clusters of 40
    outlier = np.zeros((1, x.shape[1]), dtype=np.float32)
    outlier[0, -1] = 1.0  # far from every cluster
    labeled_rows = np.concatenate([np.flatnonzero(cluster == 0)[:2], np.flatnonzero(cluster == 1)[:2]])
    rest = np.setdiff1d(np.arange(len(x)), labeled_rows)  # clusters 0 and 1 are covered
    candidates, of = np.concatenate([x[rest], outlier]), np.append(cluster[rest], -1)
    picked = TypicalCoverage(labeled=x[labeled_rows]).query(None, candidates, 3, np.random.default_rng(6))
    assert sorted(of[picked]) == [2, 3, 4]  # one per uncovered cluster, not the outlier
    for i in picked:  # each is nearer its cluster's centre than most of its cluster-mates
        members = candidates[of == of[i]]
        distances = np.linalg.norm(members - members.mean(axis=0), axis=1)
        assert np.linalg.norm(candidates[i] - members.mean(axis=0)) <= np.quantile(distances, 0.25)
    # labeled everywhere but cluster 4: the whole batch comes from there first
    covered = TypicalCoverage(labeled=x[cluster < 4]).query(None, x[cluster == 4], 2, np.random.default_rng(7))
    assert len(set(covered)) == 2
    assert len(TypicalCoverage().query(None, np.zeros((0, 3)), 5, rng)) == 0
    assert sorted(TypicalCoverage().query(None, x[:3], 5, rng)) == [0, 1, 2]


def test_diverse_batch_covers_more_gold_labels_on_real_agnews(encoder):
    """AG News (dev): among a pool's most uncertain texts, a diverse batch of 20 spans more topics
    than the 20 most uncertain (averaged over seeds; the head is fit on 16 labels per seed)."""
    from ls_backend.trainer import ControlData, fit_head

    from .support.data import AGNEWS_LABELS, agnews

    rows = agnews("dev", 280, offset=3000)
    embeddings = encoder.encode([text for text, _ in rows])
    gold = np.array([AGNEWS_LABELS.index(label) for _, label in rows])
    top, diverse, typical = [], [], []
    for seed in range(5):
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(rows))
        labeled, pool = order[:16], order[40:]
        data = ControlData("topic", AGNEWS_LABELS, False, [rows[i][0] for i in labeled], [(rows[i][1],) for i in labeled])
        head, _ = fit_head(embeddings[labeled], data, None, seed)
        p = head.probabilities(embeddings[pool])
        top.append(len(set(gold[pool][UncertaintySampling().query(p, embeddings[pool], 20, rng)])))
        diverse.append(len(set(gold[pool][DiverseUncertainty().query(p, embeddings[pool], 20, rng)])))
        chooser = TypicalCoverage(labeled=embeddings[labeled])
        typical.append(len(set(gold[pool][chooser.query(None, embeddings[pool], 20, rng)])))
    assert np.mean(diverse) > np.mean(top), (top, diverse)
    assert np.mean(typical) > np.mean(top), (top, typical)


def test_typical_still_seeks_uncovered_regions_when_the_labeled_tasks_outnumber_its_point_budget():
    rng = np.random.default_rng(4)
    x, cluster = blobs(rng, centres=2, per=300)
    region = x[cluster == 0]  # 20,000 labeled tasks all over the first region: as many as the point budget
    covered = np.repeat(region, 67, axis=0)[:20_000] + 0.01 * rng.standard_normal((20_000, x.shape[1])).astype(np.float32)
    chooser = TypicalCoverage(labeled=covered)
    picked = chooser.query(None, x, 10, rng)
    assert len(set(picked)) == 10 and (cluster[picked] == 1).all(), cluster[picked]


# -- the pool and the next batch ------------------------------------------------------------
class FakeStore:
    def __init__(self, labeled=(), skipped=()):
        self.labeled = set(labeled)
        self.skipped = set(skipped)

    def annotated_task_ids(self, project_key):
        return set(self.labeled)

    def skipped_task_ids(self, project_key):
        return set(self.skipped)

    def deleted_task_ids(self, project_key, since=None):
        return set()


def write_pool(registry, version, trained=True, ids=range(100, 140), complete=True, seed=0):
    rng = np.random.default_rng(seed)
    pools = PoolStore(registry)
    pools.start(PROJECT, version, {"control": "topic", "labels": ["a", "b", "c"], "multiple": False,
                                   "threshold": 0.5, "trained": trained})
    ids = list(ids)
    x = rng.standard_normal((len(ids), 8)).astype(np.float32)
    p = rng.dirichlet(np.ones(3), size=len(ids))
    half = len(ids) // 2
    for part in (slice(0, half), slice(half, None)):
        pools.add(PROJECT, version, PoolPart(ids[part], x[part], p[part], list(p[part].max(axis=1))))
    if complete:
        pools.finish(PROJECT, version, {})
    return np.asarray(ids), p


def test_next_batch_ranks_the_pool_and_leaves_labeled_tasks_out(tmp_path):
    settings = Settings(model_dir=tmp_path / "models", score_mode="margin")
    registry = ModelRegistry(settings.model_dir)
    with pytest.raises(NoPool):
        next_batch(settings, registry, FakeStore(), PROJECT, 5)
    ids, p = write_pool(registry, "p5-v1")
    (registry.project_dir(PROJECT) / "current").write_text("p5-v1\n")
    margins = mode_scores(p, "margin")
    expected = [int(ids[i]) for i in np.argsort(margins, kind="stable")]
    batch = next_batch(settings, registry, FakeStore(labeled=[expected[0]]), PROJECT, 5)
    assert batch.strategy == "uncertainty" and not batch.stale and batch.left_out_labeled == 1
    assert batch.task_ids == expected[1:6]
    # a task skipped since the refresh is left out as Label Studio's "unlabeled" filter leaves it out
    skipped = next_batch(settings, registry, FakeStore(labeled=[expected[0]], skipped=[expected[1]]), PROJECT, 5)
    assert skipped.task_ids == expected[2:7] and skipped.left_out_labeled == 2
    diverse = next_batch(settings, registry, FakeStore(), PROJECT, 5, "diverse")
    assert len(set(diverse.task_ids)) == 5 and set(diverse.task_ids) <= set(int(i) for i in ids)
    assert next_batch(settings, registry, FakeStore(), PROJECT, 5, "random").strategy == "random"


def test_the_complete_pool_of_the_version_standing_in_is_not_stale(tmp_path):
    """The current version does not load (or the pointer is gone): its stand-in serves, and the
    refresh completes the stand-in's pool. /next ranks it as current; stale, it queued a refresh
    job on every call (and `ls-backend rank` ran a whole refresh each time)."""
    from ls_backend.model import ClassifierHead

    settings = Settings(model_dir=tmp_path / "models")
    registry = ModelRegistry(settings.model_dir)
    head = {"topic": ClassifierHead(labels=["a", "b", "c"], weight=np.zeros((3, 8), np.float32),
                                    bias=np.zeros(3, np.float32), trained=True)}
    versions = [registry.create_version(PROJECT, head, {"kind": "fine-tune"}) for _ in range(2)]
    for version in versions:
        registry.promote(PROJECT, version)
    (registry.version_dir(PROJECT, versions[1]) / "heads.safetensors").write_bytes(b"torn")
    write_pool(registry, versions[0])
    batch = next_batch(settings, registry, FakeStore(), PROJECT, 5)
    assert (batch.pool_version, batch.current_version, batch.stale) == (versions[0], versions[0], False)
    # a refresh of the stand-in cut short is resumed by the project's next job
    from ls_backend.refresh import unfinished_refresh

    (registry.project_dir(PROJECT) / "refresh.json").write_text(json.dumps({"version": versions[0], "state": "running"}))
    assert unfinished_refresh(settings, PROJECT) == versions[0]
    (registry.project_dir(PROJECT) / "current").unlink()
    shutil.rmtree(registry.version_dir(PROJECT, versions[1]))
    assert not next_batch(settings, registry, FakeStore(), PROJECT, 5).stale


def test_an_entities_only_pool_leaves_out_the_tasks_labeled_or_deleted_since_the_refresh(tmp_path):
    """A config with <Labels> only: the pool has no classification control, and a task labeled
    since the refresh (a real webhook into the real store) must not be served again."""
    from ls_backend.store import CorrectionStore

    from .support.events import NER_CONFIG, annotation_event, key_of, project, span

    settings = Settings(model_dir=tmp_path / "models")
    registry = ModelRegistry(settings.model_dir)
    key = key_of(7)
    pools = PoolStore(registry)
    pools.start(key, "p7-v1", {"control": None, "labels": [], "multiple": False, "threshold": 0.5, "trained": True})
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    pools.add(key, "p7-v1", PoolPart([100, 101, 102], x, None, [0.1, 0.2, 0.3]))
    pools.finish(key, "p7-v1", {})
    (registry.project_dir(key) / "current").write_text("p7-v1\n")
    store = CorrectionStore(f"sqlite:///{tmp_path / 'store.sqlite'}")
    try:
        proj = project(7, config=NER_CONFIG)
        store.record_event(annotation_event(1, 100, [span(0, 6, "Angela", "PER")], text="Angela spoke", proj=proj))
        store.record_event(annotation_event(2, 101, [], text="Nothing here", proj=proj))  # labeled: no entity
        store.record_event(annotation_event(3, 102, [], cancelled=True, text="Skipped", proj=proj))
        batch = next_batch(settings, registry, store, key, 3)
        assert batch.task_ids == [] and batch.left_out_labeled == 3, batch
        # tasks deleted in Label Studio since the refresh are not offered either (their ids would 404 there);
        # a task the refresh listed after its id was deleted is a new task under that id (Label Studio on
        # SQLite reuses the id of the last task deleted): it is offered
        store.record_event({"action": "TASKS_DELETED", "tasks": [{"id": 100}, {"id": 101}, {"id": 102}], "project": proj})
        time.sleep(0.01)
        pools.start(key, "p7-v2", {"control": None, "labels": [], "multiple": False, "threshold": 0.5, "trained": True})
        pools.add(key, "p7-v2", PoolPart([102, 103, 104], x, None, [0.1, 0.2, 0.3]))
        pools.finish(key, "p7-v2", {})
        (registry.project_dir(key) / "current").write_text("p7-v2\n")
        store.record_event({"action": "TASKS_DELETED", "tasks": [{"id": 103}], "project": proj})
        assert next_batch(settings, registry, store, key, 3).task_ids == [102, 104]
    finally:
        store.close()


@pytest.mark.parametrize("multiple", [False, True])
@pytest.mark.parametrize("strategy", ["uncertainty", "diverse", "coverage", "typical", "random"])
def test_a_pool_row_that_is_not_finite_ranks_as_most_uncertain_and_never_breaks_the_answer(tmp_path, strategy, multiple):
    import json

    settings = Settings(model_dir=tmp_path / "models")
    registry = ModelRegistry(settings.model_dir)
    rng = np.random.default_rng(3)
    pools = PoolStore(registry)
    pools.start(PROJECT, "p5-v1", {"control": "topic", "labels": ["a", "b", "c"], "multiple": multiple,
                                   "threshold": 0.5, "trained": True})
    x = rng.standard_normal((30, 8)).astype(np.float32)
    # multiple: independent labels, all of them close calls; a broken row filled with 1/3 per label
    # would read as a fairly sure "none of them", and rank behind every one of these
    p = rng.uniform(0.4, 0.6, size=(30, 3)) if multiple else rng.dirichlet(np.ones(3) * 0.2, size=30)
    x[4, 2], p[4, 1] = np.nan, np.nan  # a half-precision overflow
    scores = p.max(axis=1)
    pools.add(PROJECT, "p5-v1", PoolPart(list(range(100, 130)), x, p, list(scores)))
    pools.finish(PROJECT, "p5-v1", {})
    (registry.project_dir(PROJECT) / "current").write_text("p5-v1\n")
    batch = next_batch(settings, registry, FakeStore(), PROJECT, 5, strategy)
    body = json.dumps(batch.to_dict(), allow_nan=False)  # Label Studio and browsers reject NaN in JSON
    assert len(set(batch.task_ids)) == 5, body
    # the strategies that read the scores serve it first (diverse: where the other rows are far surer;
    # among close calls everywhere, it picks by the embeddings)
    if strategy == "uncertainty" or (strategy == "diverse" and not multiple):
        assert batch.task_ids[0] == 104 and batch.scores[0] == 0.0


def test_the_pool_keeps_texts_aligned_with_task_ids(tmp_path):
    registry = ModelRegistry(tmp_path / "models")
    pools = PoolStore(registry)
    pools.start(PROJECT, "p5-v1", {"control": "topic", "labels": ["a"], "multiple": False, "trained": True})
    x = np.eye(4, 8, dtype=np.float32)
    texts = ['caf\u00e9 "quoted"', "line\nbreak", "\u65e5\u672c", ""]  # any text, as JSON bytes (no pickle)
    pools.add(PROJECT, "p5-v1", PoolPart([7, 3], x[:2], None, [0.1, 0.2], texts[:2]))
    pools.add(PROJECT, "p5-v1", PoolPart([9, 3], x[2:], None, [0.3, 0.4], texts[2:]))  # task 3 again: a redone page
    pool = pools.load(PROJECT, "p5-v1")
    assert list(pool.task_ids) == [3, 7, 9]
    by_id = {int(t): pool.texts[i] for i, t in enumerate(pool.task_ids)}
    assert by_id[7] == texts[0] and by_id[9] == texts[2] and by_id[3] in (texts[1], texts[3])
    assert np.allclose(pool.embeddings[list(pool.task_ids).index(9)], x[2])
    with pytest.raises(ValueError, match="texts"):
        pools.add(PROJECT, "p5-v1", PoolPart([11, 12], x[:2], None, [0.1, 0.2], ["one"]))
    # a part written without texts (an older pool): no texts for the pool, the rest as before
    pools.add(PROJECT, "p5-v1", PoolPart([20], x[:1], None, [0.5]))
    older = pools.load(PROJECT, "p5-v1")
    assert older.texts is None and list(older.task_ids) == [3, 7, 9, 20]


def test_before_any_trained_version_the_batch_is_chosen_for_coverage(tmp_path):
    settings = Settings(model_dir=tmp_path / "models")
    registry = ModelRegistry(settings.model_dir)
    write_pool(registry, "p5-v0", trained=False)
    (registry.project_dir(PROJECT) / "current").write_text("p5-v0\n")
    batch = next_batch(settings, registry, FakeStore(), PROJECT, 6, "uncertainty")
    assert batch.strategy == "coverage" and len(set(batch.task_ids)) == 6


def test_typical_counts_the_tasks_labeled_before_and_since_the_refresh_as_covered(tmp_path):
    settings = Settings(model_dir=tmp_path / "models")
    registry = ModelRegistry(settings.model_dir)
    rng = np.random.default_rng(8)
    x, cluster = blobs(rng, centres=3, per=20)
    ids = list(range(100, 160))
    pools = PoolStore(registry)
    pools.start(PROJECT, "p5-v0", {"control": "topic", "labels": ["a", "b", "c"], "multiple": False, "trained": False})
    pools.add(PROJECT, "p5-v0", PoolPart(ids, x, rng.dirichlet(np.ones(3), size=60), [0.5] * 60))
    pools.add_labeled(PROJECT, "p5-v0", [7, 8], x[cluster == 0][:2] + 0.01)  # labeled before the refresh
    pools.finish(PROJECT, "p5-v0", {})
    (registry.project_dir(PROJECT) / "current").write_text("p5-v0\n")
    since = [ids[i] for i in np.flatnonzero(cluster == 1)[:2]]  # labeled since, still in the pool
    batch = next_batch(settings, registry, FakeStore(labeled=since), PROJECT, 1, "typical")
    assert batch.strategy == "typical"  # needs no trained version
    assert cluster[ids.index(batch.task_ids[0])] == 2 and batch.left_out_labeled == 2
    loaded = pools.load(PROJECT, "p5-v0")
    assert loaded.labeled_ids.tolist() == [7, 8] and loaded.labeled_embeddings.shape == (2, x.shape[1])


def test_a_task_labeled_while_the_refresh_ran_counts_once_as_covered():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(6, 8)).astype(np.float32)
    pool = Pool("p5-v1", {}, np.arange(100, 106), x, None, np.full(6, 0.5),
                labeled_ids=np.asarray([7, 102]), labeled_embeddings=np.stack([x[0] + 1, x[2]]))
    since = np.isin(pool.task_ids, [102, 104])  # 102 was listed by the refresh and kept as labeled too
    covered = covered_embeddings(pool, since)
    assert len(covered) == 3  # 7, 102 and 104, each once
    assert np.array_equal(covered, np.stack([x[0] + 1, x[2], x[4]]))
    without_ids = Pool("p5-v1", {}, pool.task_ids, x, None, pool.scores, labeled_embeddings=pool.labeled_embeddings)
    assert len(covered_embeddings(without_ids, since)) == 4  # no ids to match: nothing dropped


def test_a_newer_version_serves_the_old_complete_pool_until_its_own_is_complete(tmp_path):
    settings = Settings(model_dir=tmp_path / "models")
    registry = ModelRegistry(settings.model_dir)
    write_pool(registry, "p5-v1")
    write_pool(registry, "p5-v2", complete=False, ids=range(100, 110))
    (registry.project_dir(PROJECT) / "current").write_text("p5-v2\n")
    batch = next_batch(settings, registry, FakeStore(), PROJECT, 3)
    assert batch.pool_version == "p5-v1" and batch.stale
    write_pool(registry, "p5-v2", ids=range(100, 110))
    batch = next_batch(settings, registry, FakeStore(), PROJECT, 3)
    assert batch.pool_version == "p5-v2" and not batch.stale and batch.pool_size == 10
    assert [p.name for p in PoolStore(registry).root(PROJECT).iterdir()] == ["p5-v2"]


def test_next_route(client, app):
    svc = app.extensions["ls_backend"]
    assert client.post("/setup", json={"project": PROJECT, "schema": TOPIC_CONFIG}).status_code == 200
    bad = client.get(f"/projects/{PROJECT}/next", query_string={"n": "0"})
    assert bad.status_code == 400 and "'n'" in bad.json["message"]
    assert client.get(f"/projects/{PROJECT}/next", query_string={"strategy": "bald"}).status_code == 400
    # numbers past what Python reads (4,300 digits), past 64 bits, or not ASCII digits: 400, never 500
    for query in ({"n": "9" * 5000}, {"n": "\u0665"}, {"seed": "1" * 5000},
                  {"seed": str(2**64)}, {"seed": "-1"}):
        answer = client.get(f"/projects/{PROJECT}/next", query_string=query)
        assert answer.status_code == 400 and answer.json["message"].startswith(f"'{next(iter(query))}'"), (query, answer.json)
    assert client.get("/jobs", query_string={"limit": "1" * 5000}).status_code == 400
    first = client.get(f"/projects/{PROJECT}/next")  # no refresh yet: one is queued, nothing blocks
    assert first.status_code == 202 and first.json["status"] == "preparing", first.json
    assert first.json["job"]["trigger"] == "refresh" and first.json["job"]["state"] == "queued"
    current = svc.registry.current(PROJECT)
    ids, _ = write_pool(svc.registry, current, trained=True)
    answer = client.get(f"/projects/{PROJECT}/next", query_string={"n": "007", "strategy": "diverse", "seed": "3"})
    assert answer.status_code == 200, answer.json
    body = answer.json
    assert body["n"] == 7 and len(set(body["task_ids"])) == 7 and body["pool_version"] == current
    assert body["strategy"] == "diverse" and not body["stale"]
    assert set(body["task_ids"]) <= set(int(i) for i in ids)
    assert "refresh_job" not in body
    # every task of the pool labeled or skipped: a refresh (a top-up) is queued to list what is left
    write_pool(svc.registry, current, trained=True, ids=[])
    used_up = client.get(f"/projects/{PROJECT}/next").json
    assert used_up["task_ids"] == [] and not used_up["stale"] and used_up["refresh_job"]
    assert client.get("/projects/999.1/next").status_code == 404


def test_an_entity_only_pool_is_ranked_by_the_task_scores_its_refresh_wrote(tmp_path):
    settings = Settings(model_dir=tmp_path / "models")
    registry = ModelRegistry(settings.model_dir)
    rng = np.random.default_rng(0)
    ids = list(range(100, 160))
    scores = rng.uniform(size=len(ids))
    pools = PoolStore(registry)
    pools.start(PROJECT, "p5-v2", {"control": None, "labels": [], "multiple": False, "threshold": 0.5, "trained": True})
    pools.add(PROJECT, "p5-v2", PoolPart(ids, rng.standard_normal((len(ids), 8)).astype(np.float32), None, list(scores)))
    pools.finish(PROJECT, "p5-v2", {})
    (registry.project_dir(PROJECT) / "current").write_text("p5-v2\n")
    lowest = [ids[i] for i in np.argsort(scores, kind="stable")]
    batch = next_batch(settings, registry, FakeStore(), PROJECT, 5)
    assert batch.strategy == "uncertainty" and batch.task_ids == lowest[:5]
    diverse = next_batch(settings, registry, FakeStore(), PROJECT, 5, "diverse")
    assert diverse.strategy == "diverse" and len(set(diverse.task_ids)) == 5 and set(diverse.task_ids) <= set(lowest[:50])


def test_a_broken_multiple_choice_row_ranks_first_and_the_scores_shown_are_the_ranking_ones(tmp_path):
    """A broken row was filled with 0.5 per label, which scores 0.5^3 = 0.125 under `confidence`, behind a
    row that suggests no label at 0.12; and the answer showed the scores the refresh wrote (of its own
    SCORE_MODE, the lowest over every control) beside a ranking by another."""
    settings = Settings(model_dir=tmp_path / "models")
    registry = ModelRegistry(settings.model_dir)
    pools = PoolStore(registry)
    pools.start(PROJECT, "p5-v1", {"control": "tags", "labels": ["a", "b", "c"], "multiple": True, "threshold": 0.5,
                                   "trained": True, "score_mode": "confidence"})
    p = np.array([[0.20, 0.10, 0.05], [0.12, 0.10, 0.10], [0.9, 0.8, 0.05], [np.nan, np.nan, np.nan]], np.float32)
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    written = [0.3, 0.3, 0.3, 0.0]  # what a refresh wrote (another control's lower score, say)
    pools.add(PROJECT, "p5-v1", PoolPart([100, 101, 102, 103], x, p, written))
    pools.finish(PROJECT, "p5-v1", {})
    (registry.project_dir(PROJECT) / "current").write_text("p5-v1\n")
    batch = next_batch(settings, registry, FakeStore(), PROJECT, 4)
    assert batch.task_ids == [103, 101, 100, 102], batch
    expected = mode_scores(p[[1, 0, 2]], "confidence", True, 0.5)
    assert batch.scores == [0.0] + [round(float(s), 6) for s in expected]
    margin = next_batch(Settings(model_dir=tmp_path / "models", score_mode="margin"), registry, FakeStore(), PROJECT, 4)
    margins = mode_scores(p[:3], "margin", True, 0.5)
    assert margin.score_mode == "margin" and margin.scores[1:] == sorted(round(float(s), 6) for s in margins)


def test_typical_is_not_thrown_by_a_labeled_task_whose_embedding_is_not_finite(tmp_path):
    """A labeled row that overflowed half precision turned every k-means distance into NaN: nearly
    every candidate fell into one cluster, and the batch drew from two groups of eight."""
    settings = Settings(model_dir=tmp_path / "models")
    registry = ModelRegistry(settings.model_dir)
    rng = np.random.default_rng(0)
    x = (np.repeat(np.eye(8, 16) * 5, 25, axis=0) + 0.1 * rng.standard_normal((200, 16))).astype(np.float32)
    x[0, 3] = np.nan  # task 100, in group 0, labeled since the refresh
    p = rng.dirichlet(np.ones(2), size=200).astype(np.float32)
    pools = PoolStore(registry)
    pools.start(PROJECT, "p5-v1", {"control": "topic", "labels": ["a", "b"], "multiple": False, "threshold": 0.5,
                                   "trained": True})
    pools.add(PROJECT, "p5-v1", PoolPart(list(range(100, 300)), x, p, list(p.max(axis=1))))
    pools.finish(PROJECT, "p5-v1", {})
    (registry.project_dir(PROJECT) / "current").write_text("p5-v1\n")
    batch = next_batch(settings, registry, FakeStore(labeled=[100]), PROJECT, 7, "typical", seed=13)
    groups = {(t - 100) // 25 for t in batch.task_ids}
    assert len(batch.task_ids) == 7 and len(groups) == 7, batch.task_ids  # (without the row: 7 groups as well)


def test_a_pool_removed_while_next_reads_it_is_passed_over_for_the_one_that_replaced_it(tmp_path, monkeypatch):
    """A refresh finishing removes the other versions' pools part by part: a /next reading one of
    them then failed with a 500 (a part gone), or ranked what was left as a complete pool."""
    settings = Settings(model_dir=tmp_path / "models")
    registry = ModelRegistry(settings.model_dir)
    write_pool(registry, "p5-v1")
    new_ids, _ = write_pool(registry, "p5-v2", complete=False, ids=range(100, 160))
    (registry.project_dir(PROJECT) / "current").write_text("p5-v1\n")
    pools = PoolStore(registry)
    real_load = np.load
    finished = []

    def a_refresh_finishes_meanwhile(path, *args, **kwargs):
        if not finished and "p5-v1" in str(path):
            finished.append(path)
            (registry.project_dir(PROJECT) / "current").write_text("p5-v2\n")
            pools.finish(PROJECT, "p5-v2", {})  # removes p5-v1's pool under the reader
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(np, "load", a_refresh_finishes_meanwhile)
    batch = next_batch(settings, registry, FakeStore(), PROJECT, 5)
    assert finished and batch.pool_version == "p5-v2" and batch.pool_size == len(new_ids) and batch.pool_complete
    monkeypatch.setattr(np, "load", real_load)
    # a complete pool with a part missing is no pool: never ranked as if whole
    part = sorted(pools.folder(PROJECT, "p5-v2").glob("part-*.npz"))[0]
    part.unlink()
    with pytest.raises(FileNotFoundError, match="removed meanwhile"):
        pools.load(PROJECT, "p5-v2")
    assert [p.name for p in pools.root(PROJECT).iterdir()] == ["p5-v2"]


def test_when_the_store_cannot_be_read_next_answers_503_instead_of_serving_labeled_tasks(tmp_path, encoder):
    """A PostgreSQL database that went away: the labeled and skipped tasks were taken as none (logged at
    DEBUG), and the answer offered them again as the most informative."""
    import uuid

    import sqlalchemy as sa

    from ls_backend.api import create_app
    from ls_backend.predictor import Predictor
    from ls_backend.store import CorrectionStore, database_url

    from .support.events import annotation_event, choices, key_of
    from .support.services import unavailable
    from .support.stores import POSTGRES_URL

    admin = sa.create_engine(database_url(POSTGRES_URL), isolation_level="AUTOCOMMIT")
    name = f"t_next_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        admin.dispose()
        unavailable(f"PostgreSQL at {POSTGRES_URL} is not reachable ({type(exc).__name__})")
    url = POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
    settings = Settings(model_dir=tmp_path / "models", database_url=url)
    registry = ModelRegistry(settings.model_dir)
    key = key_of(3)
    store = CorrectionStore.from_settings(settings)
    try:
        store.record_event(annotation_event(1, 100, choices("World")))
        store.record_event(annotation_event(2, 101, [], cancelled=True))
        pools = PoolStore(registry)
        pools.start(key, "p3-v1", {"control": "topic", "labels": ["a", "b"], "multiple": False, "trained": True})
        p = np.array([[0.5, 0.5], [0.51, 0.49], [0.9, 0.1], [0.8, 0.2]], dtype=np.float32)  # 100, 101: least sure
        pools.add(key, "p3-v1", PoolPart([100, 101, 102, 103], np.eye(4, 8, dtype=np.float32), p, list(p.max(axis=1))))
        pools.finish(key, "p3-v1", {})
        (registry.project_dir(key) / "current").write_text("p3-v1\n")
        assert next_batch(settings, registry, store, key, 2).task_ids == [103, 102]
        client = create_app(settings, Predictor(settings, encoder=encoder)).test_client()
        assert client.get(f"/projects/{key}/next?n=2").get_json()["task_ids"] == [103, 102]
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        with pytest.raises(sa.exc.OperationalError):
            next_batch(settings, registry, store, key, 2)
        response = client.get(f"/projects/{key}/next?n=2")
        assert response.status_code == 503 and response.get_json()["error"] == "store_unavailable", response.get_json()
        assert "DATABASE_URL" in response.get_json()["message"]
    finally:
        store.close()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_typicality_in_blocks_is_the_typicality_of_the_whole(monkeypatch):
    """Typicality is computed a block of candidates at a time (a cluster of 20,000 candidates took
    1.35 GB at once); the figures do not depend on the block."""
    rng = np.random.default_rng(5)
    points = rng.standard_normal((300, 16))
    members, which = np.arange(300), np.arange(0, 300, 2)
    whole = TypicalCoverage().typicality(points, members, which, np.random.default_rng(0))
    monkeypatch.setattr(TypicalCoverage, "BLOCK", 7)
    blocked = TypicalCoverage().typicality(points, members, which, np.random.default_rng(0))
    assert np.allclose(whole, blocked) and len(blocked) == len(which) and (blocked > 0).all()
