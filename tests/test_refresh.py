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
