"""The "Start Training" button of a real Label Studio 1.23 trains a new version that Label Studio then uses.

The whole loop is real: Label Studio's API creates the project, imports AG News texts, connects
the backend (``ls-backend serve``, embedded job runner, no Redis), retrieves predictions,
stores annotations (each sends ANNOTATION_CREATED to our webhook) and sends START_TRAINING
(``POST /api/ml/{id}/train``). The backend syncs from Label Studio's API, trains, promotes a new
version, and the next "Retrieve predictions" stores predictions of that version.

What Label Studio does with tasks that already hold a prediction: "Retrieve predictions" skips
only tasks that hold a prediction of the version ``/setup`` answers now; every other task is sent
to ``/predict`` and gets a new prediction beside its old one (old predictions are never replaced).
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict

import pytest
import requests

from tests.support.backend import BackendServer
from tests.support.data import AGNEWS_LABELS
from tests.support.events import TOPIC_CONFIG, project_key
from tests.support.loop import balanced_agnews

pytestmark = pytest.mark.e2e

PER_LABEL = 10  # 40 tasks
LABELED_PER_LABEL = 8  # 32 annotated through Label Studio



def wait_for(condition, timeout: float, what: str, context=lambda: ""):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{context()}")
        time.sleep(0.5)


def test_start_training_in_label_studio_makes_it_hold_predictions_of_the_new_version(label_studio, tmp_path):
    ls = label_studio
    rows = balanced_agnews(PER_LABEL, split="dev")
    assert len(rows) == PER_LABEL * len(AGNEWS_LABELS)

    project = ls.create_project("AG News training (e2e)", TOPIC_CONFIG)
    project_id, key = project["id"], project_key(project)
    task_ids = ls.import_tasks(project_id, [{"text": text} for _, text, _ in rows])
    gold = {task_id: label for task_id, (_, _, label) in zip(task_ids, rows)}

    env = {
        "REDIS_URL": "",  # embedded job runner beside the web workers
        "TRAIN_EVERY": "0",  # only the button trains
        "TRAIN_MODE": "frozen",
        # 32 labels leave a 12-task evaluation slice, where one task is 8 points: the gate (tested in
        # tests/test_gating.py) can refuse a head that is better on 600 test rows by a single slice task.
        # This test is about Label Studio's side of the loop, so the job's version always goes live.
        "FORCE_PROMOTE": "true",
        "WEB_WORKERS": "2",
        "SYNC_CHECK_INTERVAL": "0",
        "LABEL_STUDIO_URL": ls.url,
        "LABEL_STUDIO_API_KEY": ls.token,
    }
    backend = BackendServer(tmp_path / "models", env=env).start()

    def context() -> str:
        return f"\nbackend log:\n{backend.log()}\nLabel Studio log ({ls.log_path}):\n{ls.log_tail(40)}"

    def ours(path: str, **params) -> dict:
        response = requests.get(backend.url + path, params=params, timeout=10)
        assert response.ok, f"GET {path} answered {response.status_code}: {response.text}"
        return response.json()

    try:
        ml_id = ls.connect_ml_backend(project_id, backend.url, title="ls-backend training e2e")
        assert ls.ml_backend(ml_id)["state"] == "CO", context()
        cold = f"p{project_id}-v0"
        assert ls.ml_backend(ml_id)["model_version"] == cold, context()

        # 1. cold start: one prediction per task, all of v0
        ls.retrieve_predictions(project_id)
        first = ls.predictions(project_id)
        assert Counter(p["task"] for p in first) == Counter(task_ids), context()
        assert {p["model_version"] for p in first} == {cold}, context()
        cold_hits = sum(p["result"][0]["value"]["choices"][0] == gold[p["task"]] for p in first)

        # 2. annotate 32 tasks with their gold labels; each save sends ANNOTATION_CREATED to us
        labeled = ls.annotate_gold(task_ids, gold, LABELED_PER_LABEL)
        assert len(labeled) == LABELED_PER_LABEL * len(AGNEWS_LABELS)
        assert ls.project(project_id)["total_annotations_number"] == len(labeled)
        summary = ours(f"/projects/{key}")
        assert summary["annotations"] == len(labeled), f"webhooks did not all reach the store: {summary}{context()}"
        assert summary["labels"]["topic"] == {label: LABELED_PER_LABEL for label in AGNEWS_LABELS}, summary
        assert ours("/jobs", project=key)["jobs"] == [], "TRAIN_EVERY=0: labels alone must not train"

        # 3. "Start Training": START_TRAINING -> sync from Label Studio's API -> a job -> a new version
        ls.train(ml_id)
        job = wait_for(
            lambda: next((j for j in ours("/jobs", project=key)["jobs"] if j["state"] in ("finished", "failed")), None),
            timeout=300,
            what="the START_TRAINING job",
            context=context,
        )
        jobs = ours("/jobs", project=key)["jobs"]
        assert len(jobs) == 1, jobs
        assert job["trigger"] == "START_TRAINING" and job["state"] == "finished", f"{job}{context()}"
        new = job["version"]
        assert job["result"]["promoted"] and new and new != cold, f"{job}{context()}"
        assert job["result"]["labels"] >= len(labeled) * 0.6, job  # the training share (the rest is the slice)
        versions = ours(f"/projects/{key}/versions")
        assert versions["current"] == new, versions
        sync = ours(f"/projects/{key}")["last_sync"]
        assert sync and sync["reason"] == "START_TRAINING" and sync["label_studio_annotations"] == len(labeled), sync

        # 4. "Retrieve predictions" again: /setup answers the new version, so no task is skipped
        time.sleep(1.5)  # past VERSION_CHECK_INTERVAL: every web worker notices the new current version
        ls.retrieve_predictions(project_id)
        second = ls.predictions(project_id)
        by_task = defaultdict(dict)
        for prediction in second:
            by_task[prediction["task"]][prediction["model_version"]] = prediction
        assert set(by_task) == set(task_ids), context()
        missing = [t for t in task_ids if new not in by_task[t]]
        assert not missing, f"tasks without a prediction of {new}: {missing}{context()}"
        # the old prediction stays beside the new one: exactly one of each version per task
        assert Counter(p["model_version"] for p in second) == {cold: len(task_ids), new: len(task_ids)}, second
        assert ls.ml_backend(ml_id)["model_version"] == new, ls.ml_backend(ml_id)

        new_hits = sum(by_task[t][new]["result"][0]["value"]["choices"][0] == gold[t] for t in task_ids)
        assert new_hits >= cold_hits, (new_hits, cold_hits)

        # 5. a third "Retrieve predictions" sends nothing: every task holds the current version
        def predict_calls() -> int:
            return backend.log_path.read_text(errors="replace").count(f"version {new}: predicted")

        before = predict_calls()
        ls.retrieve_predictions(project_id)
        assert len(ls.predictions(project_id)) == 2 * len(task_ids)
        assert predict_calls() == before
    finally:
        backend.stop()
