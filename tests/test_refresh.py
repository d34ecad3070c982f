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


class FakePredictions:
    """Label Studio's side of a refresh (``LabelStudioPredictions``): unlabeled tasks by id, bulk writes."""

    url = "http://label-studio.test"

    def __init__(self, ls_id: int, n_tasks: int):
        from tests.support.events import TOPIC_CONFIG

        self.ls_id, self.config, self.model_version = ls_id, TOPIC_CONFIG, ""
        self.tasks = {i: {"id": i, "data": {"text": f"The match ended in a draw, report {i}"}, "predictions": []}
                      for i in range(1, n_tasks + 1)}

    def unlabeled_after(self, after_id, size):
        rows = [t for i, t in sorted(self.tasks.items()) if i > after_id]
        return [{"id": t["id"], "data": t["data"], "versions": {p["model_version"] for p in t["predictions"]}}
                for t in rows[:size]], len(rows)

    def create(self, rows):
        for row in rows:
            self.tasks[row["task"]]["predictions"].append(row)
        return len(rows)

    def project(self):
        from tests.support.events import key_of

        return key_of(self.ls_id), self.model_version, self.config

    def set_model_version(self, version):
        self.model_version = version


def test_a_task_whose_probabilities_are_not_finite_does_not_stop_the_refresh(tmp_path, monkeypatch, encoder):
    """A half-precision overflow gives one task of each page a row of NaN: the refresh still
    finishes (it stopped at that page on every try, and /next stayed stale), the task gets no
    prediction, and the pool keeps it (/next ranks such a row first: test_sampling)."""
    import numpy as np

    from ls_backend import model
    from ls_backend.refresh import PredictionRefresh
    from ls_backend.registry import ModelRegistry
    from ls_backend.sampling import next_batch
    from ls_backend.store import CorrectionStore
    from tests.support.events import key_of

    probabilities = model.ClassifierHead.probabilities

    def overflowing(self, embeddings):
        out = np.array(probabilities(self, embeddings), dtype=np.float32)
        out[0] = np.nan  # the first task of each page
        return out

    monkeypatch.setattr(model.ClassifierHead, "probabilities", overflowing)
    settings = Settings(model_dir=tmp_path / "models", refresh_page_size=5)
    store = CorrectionStore(f"sqlite:///{tmp_path / 'store.sqlite'}")
    studio = FakePredictions(5, 12)
    try:
        report = PredictionRefresh(settings, store, api=studio, encoder=encoder).run(key_of(5))
        assert report.state == "finished" and report.tasks == 12, report
        written = sorted(i for i, t in studio.tasks.items() if t["predictions"])
        assert written == [2, 3, 4, 5, 7, 8, 9, 10, 12]  # tasks 1, 6 and 11 overflowed: no prediction
        batch = next_batch(settings, ModelRegistry(settings.model_dir), store, key_of(5), 3, "random")
        assert batch.pool_size == 12 and not batch.stale
    finally:
        store.close()


def test_a_short_batch_from_a_bounded_refresh_queues_a_top_up_and_a_resumed_refresh_stays_bounded(
        tmp_path, monkeypatch, encoder):
    """REFRESH_MAX_TASKS=10 of 25 unlabeled tasks: once most of the pool is labeled, /next answers
    the few left and queues a top-up (it waited until none was left); a refresh killed after its
    last page, resumed, still says it stopped at the bound."""
    from ls_backend.api import create_app
    from ls_backend.predictor import Predictor
    from ls_backend.refresh import PredictionRefresh
    from ls_backend.store import CorrectionStore
    from tests.support.events import annotation_event, choices, key_of, project

    settings = Settings(model_dir=tmp_path / "models", refresh_page_size=5, refresh_max_tasks=10)
    store = CorrectionStore.from_settings(settings)
    studio = FakePredictions(5, 25)
    key = key_of(5)
    try:
        killed = PredictionRefresh(settings, store, api=studio, encoder=encoder)
        monkeypatch.setattr(killed, "_labeled_part", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
        try:
            killed.run(key)  # killed after its last page, before it said it had finished
        except KeyboardInterrupt:
            pass
        report = PredictionRefresh(settings, store, api=studio, encoder=encoder).run(key)
        assert report.state == "finished" and report.tasks == 10 and report.bounded, report
        for task in range(1, 9):  # 8 of the 10 pooled tasks labeled since
            store.record_event(annotation_event(task, task, choices("Sports"), proj=project(5)))
        client = create_app(settings, Predictor(settings, encoder=encoder)).test_client()
        answer = client.get(f"/projects/{key}/next?n=5&strategy=random")
        assert answer.status_code == 200 and sorted(answer.json["task_ids"]) == [9, 10], answer.json
        assert answer.json.get("refresh_job"), answer.json  # 15 more unlabeled tasks wait in Label Studio
        enough = client.get(f"/projects/{key}/next?n=2&strategy=random")
        assert "refresh_job" not in enough.json  # as many as asked for: nothing to top up
    finally:
        store.close()


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
