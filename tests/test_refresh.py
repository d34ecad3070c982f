"""The refresh of predictions after a promotion, against an in-memory Label Studio (the real one: tests/e2e)."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from ls_backend.predictor import Predictor
from ls_backend.refresh import PredictionRefresh, RefreshError
from ls_backend.registry import ModelRegistry
from ls_backend.sampling import PoolStore, next_batch
from ls_backend.settings import Settings

from .conftest import TOPIC_CONFIG

PROJECT = "5.1732665262"
TEXTS = [
    "Stocks fell as oil prices rose", "The striker scored twice in the final", "Intel unveils a faster chip",
    "Rebels seize a town in the north", "The central bank holds rates", "NASA probe reaches Mars orbit",
    "Coach sacked after the defeat", "Parliament passes the budget", "A new phone from Apple",
    "Oil company posts record profit", "Tennis star wins the open", "Scientists map the genome",
]


class FakeLabelStudio:
    """The four calls a refresh makes, over tasks held in memory."""

    def __init__(self, texts, labeled=(), skipped=(), model_version=""):
        self.tasks = {100 + i: {"data": {"text": t}, "annotations": 0, "cancelled": 0} for i, t in enumerate(texts)}
        for task_id in labeled:
            self.tasks[task_id]["annotations"] = 1
        for task_id in skipped:
            self.tasks[task_id]["cancelled"] = 1
        self.predictions: list[dict] = []
        self.model_version = model_version
        self.imports = 0
        self.ls_id, self.url = 5, "fake"

    def unlabeled_after(self, after_id, size):
        ids = [t for t in sorted(self.tasks) if t > after_id and not self.tasks[t]["annotations"]
               and not self.tasks[t]["cancelled"]]
        page = ids[:size]
        versions = lambda t: {p["model_version"] for p in self.predictions if p["task"] == t}  # noqa: E731
        return [{"id": t, "data": self.tasks[t]["data"], "versions": versions(t)} for t in page], len(ids)

    def create(self, rows):
        self.imports += 1
        self.predictions.extend(dict(row) for row in rows)
        return len(rows)

    def project(self):
        return PROJECT, self.model_version, TOPIC_CONFIG

    def set_model_version(self, version):
        self.model_version = version

    def per_task(self, version):
        return Counter(p["task"] for p in self.predictions if p["model_version"] == version)


class Store:
    def latest_label_config(self, key):
        return TOPIC_CONFIG

    def annotation_results(self, key, control, include_empty=False):
        return []


@pytest.fixture
def project(tmp_path, encoder):
    """A project whose current version is a trained copy of its cold start (``p5-v1``)."""
    settings = Settings(model_dir=tmp_path / "models", max_length=128, refresh_page_size=4)
    registry = ModelRegistry(settings.model_dir)
    Predictor(settings, registry, encoder=encoder).setup(PROJECT, TOPIC_CONFIG)
    v0 = registry.load(PROJECT, "p5-v0")
    heads = {name: replace(head, trained=True) for name, head in v0.heads.items()}
    version = registry.create_version(PROJECT, heads, dict(v0.meta, kind="fine-tune", parent="p5-v0"))
    registry.promote(PROJECT, version)
    return settings, registry, version


def refresh(settings, registry, api, encoder, progress=None):
    return PredictionRefresh(settings, Store(), registry, api=api, encoder=encoder, progress=progress).run(PROJECT)


def test_one_prediction_per_unlabeled_task_and_labeled_tasks_left_alone(project, encoder):
    settings, registry, version = project
    texts = TEXTS[:-1] + ["   "]  # the last task has no readable text
    api = FakeLabelStudio(texts, labeled=[100, 103], skipped=[105])
    updates = []
    report = refresh(settings, registry, api, encoder, updates.append)
    unlabeled = [t for t in api.tasks if t not in (100, 103, 105)]
    written = api.per_task(version)
    assert set(written) == set(unlabeled) - {111} and set(written.values()) == {1}
    assert report.state == "finished" and report.written == len(unlabeled) - 1 and report.unreadable == 1
    assert report.tasks == len(unlabeled) and report.pages == 3 and api.imports == 3
    for prediction in api.predictions:
        assert 0 <= prediction["score"] <= 1 and prediction["result"][0]["from_name"] == "topic"
    assert updates[-1]["step"] == updates[-1]["steps"] == len(unlabeled)
    pool = PoolStore(registry).load(PROJECT, version)
    assert pool.complete and pool.trained and sorted(pool.task_ids) == sorted(written)
    assert pool.embeddings.shape == (len(written), encoder.dim) and pool.probabilities.shape == (len(written), 4)
    assert np.allclose(np.linalg.norm(pool.embeddings, axis=1), 1, atol=1e-2)
    assert pool.meta["encoder"] == f"base:{settings.encoder_path}"  # what a job checks before self-training on it
    # each task's text, in task id order: what a job re-reads with the encoder it fine-tunes
    assert pool.texts == [api.tasks[t]["data"]["text"] for t in pool.task_ids]
    # the same version again writes nothing
    again = refresh(settings, registry, api, encoder)
    assert again.reason == "already refreshed" and api.imports == 3
    batch = next_batch(settings, registry, Store(), PROJECT, 3)
    assert batch.strategy == "uncertainty" and len(batch.task_ids) == 3 and not batch.stale


def test_bounded_by_refresh_max_tasks(project, encoder):
    settings, registry, version = project
    api = FakeLabelStudio(TEXTS)
    report = refresh(replace(settings, refresh_max_tasks=5), registry, api, encoder)
    assert report.written == 5 and report.bounded
    assert sorted(api.per_task(version)) == [100, 101, 102, 103, 104]


def test_interrupted_after_writing_a_page_resumes_without_duplicates(project, encoder, monkeypatch):
    settings, registry, version = project
    api = FakeLabelStudio(TEXTS)
    saves = {"n": 0}
    original = PredictionRefresh._save_cursor

    def crash_on_second_page(self, key, cursor):  # the worst moment: predictions written, cursor not moved
        if cursor.get("pages") == 2:
            raise KeyboardInterrupt("worker killed")
        saves["n"] += 1
        original(self, key, cursor)

    monkeypatch.setattr(PredictionRefresh, "_save_cursor", crash_on_second_page)
    with pytest.raises(KeyboardInterrupt):
        refresh(settings, registry, api, encoder)
    assert len(api.predictions) == 8  # two pages written, the cursor past the first only
    monkeypatch.setattr(PredictionRefresh, "_save_cursor", original)
    report = refresh(settings, registry, api, encoder)
    assert report.resumed_after == 103 and report.already_there == 4
    assert api.per_task(version) == Counter({t: 1 for t in api.tasks})
    # the crashed run's second page was written but never counted: the resumed run finds it there
    assert report.state == "finished" and report.written + report.already_there == len(TEXTS)
    pool = PoolStore(registry).load(PROJECT, version)
    assert sorted(pool.task_ids) == sorted(api.tasks)
    assert pool.texts == [api.tasks[t]["data"]["text"] for t in pool.task_ids]  # the redone page's texts once


def test_a_new_version_is_refreshed_and_label_studios_choice_follows_ours(project, encoder):
    settings, registry, version = project
    api = FakeLabelStudio(TEXTS, model_version="p5-v0")
    refresh(settings, registry, api, encoder)
    assert api.model_version == version
    loaded = registry.load(PROJECT, version)
    newer = registry.create_version(PROJECT, loaded.heads, dict(loaded.meta, parent=version))
    registry.promote(PROJECT, newer)
    api.model_version = "ls-backend"  # the backend's title (live predictions): the user's choice
    report = refresh(settings, registry, api, encoder)
    assert report.written == len(TEXTS) and not report.followed and api.model_version == "ls-backend"
    assert api.per_task(newer) == api.per_task(version) == Counter({t: 1 for t in api.tasks})
    assert [p.name for p in PoolStore(registry).root(PROJECT).iterdir()] == [newer]


def test_another_label_studio_project_is_refused(project, encoder):
    settings, registry, _ = project
    api = FakeLabelStudio(TEXTS)
    api.project = lambda: ("5.1", "", TOPIC_CONFIG)
    with pytest.raises(RefreshError, match="re-created"):
        refresh(settings, registry, api, encoder)
    assert api.predictions == []


def test_the_worker_refreshes_after_a_promotion_only(tmp_path, monkeypatch):
    from ls_backend import finetune, jobs, refresh as refresh_module

    calls = []
    monkeypatch.setattr(refresh_module, "refresh_predictions",
                        lambda settings, store, key, progress=None, raise_errors=False: calls.append((key, raise_errors)) or {"state": "finished"})
    settings = Settings(model_dir=tmp_path / "models")
    for promoted in (True, False):
        monkeypatch.setattr(finetune.FineTuneJob, "run", lambda self, key, trigger, p=promoted: {"version": "p5-v2", "promoted": p})
        result = jobs.execute_training(settings, PROJECT, "labels")
        assert ("refresh" in result) is promoted
    assert calls == [(PROJECT, False)]
    assert jobs.execute_training(settings, PROJECT, "refresh") == {"state": "finished"}
    assert calls[-1] == (PROJECT, True)


def test_cold_start_refresh_makes_v0_and_the_first_batch_is_chosen_for_coverage(tmp_path, encoder):
    class Unknown(Store):  # the store has not seen the project: its config comes from Label Studio
        def latest_label_config(self, key):
            return None

    settings = Settings(model_dir=tmp_path / "models", max_length=128, refresh_page_size=50)
    registry = ModelRegistry(settings.model_dir)
    api = FakeLabelStudio(TEXTS)
    report = PredictionRefresh(settings, Unknown(), registry, api=api, encoder=encoder).run(PROJECT)
    assert report.version == "p5-v0" == registry.current(PROJECT) and report.written == len(TEXTS)
    batch = next_batch(settings, registry, Unknown(), PROJECT, 4, "uncertainty")
    assert batch.strategy == "coverage" and len(set(batch.task_ids)) == 4
