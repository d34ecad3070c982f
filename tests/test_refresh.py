"""What the worker does after a job: a refresh of predictions after a promotion, or where one was asked for.

The refresh itself runs against a real Label Studio 1.23 in ``tests/e2e/test_refresh_cases_e2e.py``
(its bound, unreadable tasks, pages and pool, a re-created project, whose ``model_version`` it
follows, the cold start) and ``tests/e2e/test_refresh_e2e.py`` (the whole loop, an interrupted
refresh resumed without duplicates, Label Studio's ordering by the new scores).
"""

from __future__ import annotations

from ls_backend.settings import Settings

PROJECT = "5.1732665262"


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


def test_a_refresh_asked_for_while_a_job_was_queued_runs_whatever_the_outcome(tmp_path, monkeypatch):
    from ls_backend import finetune, jobs, refresh as refresh_module

    calls = []
    monkeypatch.setattr(refresh_module, "refresh_predictions",
                        lambda settings, store, key, progress=None, raise_errors=False: calls.append(key) or {"state": "finished"})
    settings = Settings(model_dir=tmp_path / "models")
    trained = []

    def run(self, key, trigger):
        trained.append(trigger)
        raise finetune.NothingToTrain("no label changed")

    monkeypatch.setattr(finetune.FineTuneJob, "run", run)
    result = jobs.execute_training(settings, PROJECT, "labels+refresh")
    assert trained == ["labels"]  # the job trains under its own trigger
    assert result["version"] is None and result["refresh"] == {"state": "finished"}
    assert calls == [PROJECT]
    assert "refresh" not in jobs.execute_training(settings, PROJECT, "labels")
    assert calls == [PROJECT]


def test_a_job_resumes_the_served_versions_refresh_that_a_killed_job_left_unfinished(tmp_path, monkeypatch):
    """A job killed by JOB_TIMEOUT while refreshing is retried; its labels did not change, so it makes
    no version, and it must still finish the refresh (else Label Studio orders by a half-written version)."""
    import json

    from ls_backend import finetune, jobs, refresh as refresh_module
    from ls_backend.registry import ModelRegistry

    calls = []
    monkeypatch.setattr(refresh_module, "refresh_predictions",
                        lambda settings, store, key, progress=None, raise_errors=False: calls.append(key) or {"state": "finished"})
    monkeypatch.setattr(finetune.FineTuneJob, "run",
                        lambda self, key, trigger: (_ for _ in ()).throw(finetune.NothingToTrain("no label changed")))
    settings = Settings(model_dir=tmp_path / "models")
    folder = ModelRegistry(settings.model_dir).project_dir(PROJECT)
    folder.mkdir(parents=True)
    (folder / "current").write_text("p5-v2\n")
    cursor = folder / "refresh.json"
    for state, version, resumed in (("running", "p5-v2", True), ("finished", "p5-v2", False),
                                    ("running", "p5-v1", False)):  # an older version's: not served any more
        cursor.write_text(json.dumps({"version": version, "state": state, "after_id": 40}))
        result = jobs.execute_training(settings, PROJECT, "labels")
        assert ("refresh" in result) is resumed, (state, version, result)
    assert calls == [PROJECT]


def test_rank_answers_from_the_pool_there_is_when_label_studio_is_out_of_reach(tmp_path):
    """``ls-backend rank`` with the previous version's pool and no way to reach Label Studio (no
    LABEL_STUDIO_URL, no token from /setup): it ranks that pool, stale, as GET /next does, and says
    why it did not refresh; asked to refresh, or with no pool at all, the reason is the answer."""
    import numpy as np
    import pytest

    from ls_backend.refresh import rank_project
    from ls_backend.registry import ModelRegistry
    from ls_backend.sampling import PoolPart, PoolStore
    from ls_backend.store import CorrectionStore
    from ls_backend.sync import SyncError
    from tests.support.events import annotation_event, choices, key_of, project

    settings = Settings(model_dir=tmp_path / "models")
    store = CorrectionStore.from_settings(settings)
    key = key_of(5)
    try:
        store.record_event(annotation_event(1, 1, choices("World"), text="hello", proj=project(5)))
        with pytest.raises(SyncError):  # no pool yet: nothing to rank
            rank_project(settings, store, key, 3)
        registry = ModelRegistry(settings.model_dir)
        pools = PoolStore(registry)
        pools.start(key, "p5-v1", {"control": "topic", "labels": list("abcd"), "multiple": False, "threshold": 0.5,
                                   "trained": True})
        rng = np.random.default_rng(0)
        pools.add(key, "p5-v1", PoolPart(list(range(10, 40)), rng.standard_normal((30, 8)).astype(np.float32),
                                         rng.dirichlet(np.ones(4), 30).astype(np.float32), [0.5] * 30))
        pools.finish(key, "p5-v1", {})
        (registry.project_dir(key) / "current").write_text("p5-v2\n")  # v2 promoted, its refresh not run
        body = rank_project(settings, store, key, 3)
        assert body["stale"] and len(body["task_ids"]) == 3 and body["pool_version"] == "p5-v1", body
        assert body["refresh"]["state"] == "failed" and "LABEL_STUDIO_URL" in body["refresh"]["reason"]
        with pytest.raises(SyncError):
            rank_project(settings, store, key, 3, refresh=True)
    finally:
        store.close()


# -- the refresh against a Label Studio that answers as told ----------------------------------------
class ScriptedLabelStudio:
    """The calls of a refresh (``LabelStudioPredictions``), over tasks in memory; ``lose_answer``:
    how many imports to write and then fail as a proxy's 502 would; ``fail_before``: how many to
    fail without writing."""

    ls_id, url = 5, "http://label-studio.test"

    def __init__(self, tasks, config, lose_answer=0, fail_before=0):
        self.tasks, self.config = tasks, config
        self.lose_answer, self.fail_before = lose_answer, fail_before
        self.predictions: list[dict] = []
        self.imports = 0

    def project(self):
        return PROJECT, "", self.config

    def unlabeled_after(self, after_id, size, up_to=None):
        listed = [dict(t, versions={p["model_version"] for p in self.predictions if p["task"] == t["id"]})
                  for t in self.tasks if t["id"] > after_id and (up_to is None or t["id"] <= up_to)]
        return listed[:size], len(listed)

    def create(self, rows):
        from ls_backend.refresh import RefreshError

        self.imports += 1
        if self.fail_before:
            self.fail_before -= 1
            raise RefreshError("502 Bad Gateway", 502)
        self.predictions.extend(rows)
        if self.lose_answer:
            self.lose_answer -= 1
            raise RefreshError("502 Bad Gateway (written, answer lost)", 502)
        return len(rows)

    def set_model_version(self, version):
        pass


def scripted_refresh(tmp_path, encoder, studio):
    from ls_backend.refresh import PredictionRefresh
    from ls_backend.registry import ModelRegistry

    settings = Settings(model_dir=tmp_path / "models", max_length=128, refresh_page_size=50)
    return PredictionRefresh(settings, None, ModelRegistry(settings.model_dir), api=studio, encoder=encoder).run(PROJECT)


def test_an_import_whose_answer_was_lost_is_not_written_twice(tmp_path, encoder):
    """The client re-sent a failed import (a 5xx, a dropped connection) whatever Label Studio had
    committed: a proxy's 502 after the write gave every task of the page two predictions."""
    from collections import Counter

    from tests.support.events import TOPIC_CONFIG

    texts = ["Stocks fell", "The striker scored", "A faster chip", "Rebels seize a town"]
    tasks = [{"id": i + 1, "data": {"text": t}} for i, t in enumerate(texts)]
    lost = ScriptedLabelStudio(tasks, TOPIC_CONFIG, lose_answer=1)
    report = scripted_refresh(tmp_path / "lost", encoder, lost)
    assert Counter(p["task"] for p in lost.predictions) == Counter({1: 1, 2: 1, 3: 1, 4: 1})
    assert report.state == "finished" and lost.imports == 1
    # an import that failed before Label Studio wrote it is sent again, once
    failed = ScriptedLabelStudio(tasks, TOPIC_CONFIG, fail_before=1)
    report = scripted_refresh(tmp_path / "failed", encoder, failed)
    assert Counter(p["task"] for p in failed.predictions) == Counter({1: 1, 2: 1, 3: 1, 4: 1})
    assert report.written == 4 and failed.imports == 2


def test_the_import_of_predictions_is_never_re_sent_by_the_client():
    """label-studio-sdk re-sends a POST on a 5xx or a dropped connection, committed or not."""
    from types import SimpleNamespace

    from ls_backend.refresh import LabelStudioPredictions

    calls = []

    def import_predictions(**kwargs):
        calls.append(kwargs)
        return SimpleNamespace(created=len(kwargs["request"]))

    client = SimpleNamespace(projects=SimpleNamespace(import_predictions=import_predictions))
    written = LabelStudioPredictions(client, 5).create([{"task": 1, "result": [], "score": 0.5, "model_version": "p5-v1"}])
    assert written == 1 and calls[0]["request_options"] == {"max_retries": 0}


def test_after_base_model_changes_the_refresh_writes_the_cold_start_setup_answers(tmp_path, encoder):
    """The refresh wrote the old base model's version, whose heads read the new encoder's embeddings,
    while /setup answered a cold start on the new one."""
    from ls_backend.model import Encoder
    from ls_backend.predictor import Predictor
    from ls_backend.refresh import PredictionRefresh
    from ls_backend.registry import ModelRegistry

    from tests.support.events import TOPIC_CONFIG

    from .test_serving_encoders import tiny_bert

    tiny = tiny_bert(tmp_path / "tiny")
    models = tmp_path / "models"
    assert Predictor(Settings(model_dir=models, max_length=128), encoder=encoder).setup(PROJECT, TOPIC_CONFIG) == "p5-v0"
    settings = Settings(model_dir=models, max_length=64, base_model=str(tiny), refresh_page_size=50)
    studio = ScriptedLabelStudio([{"id": 1, "data": {"text": "Stocks fell"}}], TOPIC_CONFIG)
    registry = ModelRegistry(models)
    # the first thing after the change: a job's refresh, before any /setup
    report = PredictionRefresh(settings, None, registry, api=studio, encoder=Encoder(tiny, "cpu", 64)).run(PROJECT)
    answered = Predictor(settings).setup(PROJECT, TOPIC_CONFIG)
    assert report.version == answered == "p5-v1" and [p["model_version"] for p in studio.predictions] == ["p5-v1"]
