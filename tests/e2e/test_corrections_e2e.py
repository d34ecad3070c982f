"""End to end with a real Label Studio 1.23: its annotations reach our store, by webhook and by sync.

``label_studio`` is the session's Label Studio (tests/e2e/conftest.py); this test makes a project of its own.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest
import requests

from ls_backend.labeling import plan_for
from ls_backend.store import CorrectionStore
from tests.support.backend import BackendServer, console_script
from tests.support.events import TOPIC_CONFIG, choices

pytestmark = pytest.mark.e2e

TOPIC = plan_for(TOPIC_CONFIG).control("topic")
LABELS = ("World", "Sports", "Business", "Sci/Tech")


def wait_for(condition, timeout: float = 60.0, what: str = "condition", log=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; backend log:\n{log()}")


def stored_labels(server: BackendServer, key: str) -> dict[int, tuple[str, ...]]:
    store = CorrectionStore(f"sqlite:///{server.model_dir / 'store.sqlite'}")
    try:
        return {e.annotation_id: e.labels for e in store.training_examples(key, TOPIC)}
    finally:
        store.close()


def connect(label_studio, project_id: int, backend: BackendServer) -> int:
    """Connect the backend; once more if Label Studio gave up on a slow first /setup (its timeout is 3 s,
    and the first /setup of a project builds the cold-start version)."""
    from tests.support.label_studio import LabelStudioError

    try:
        return label_studio.connect_ml_backend(project_id, backend.url)
    except LabelStudioError:
        time.sleep(2)
        return label_studio.connect_ml_backend(project_id, backend.url)


def summary(server: BackendServer, key: str) -> dict:
    return requests.get(f"{server.url}/projects/{key}", timeout=10).json()


def ls_annotations(label_studio, project_id: int) -> dict[int, tuple[str, ...]]:
    """Label Studio's own view: annotation id -> its choices."""
    return {
        a["id"]: tuple(a["result"][0]["value"]["choices"])
        for task in label_studio.tasks(project_id)
        for a in task["annotations"]
        if not a["was_cancelled"]
    }


def test_annotations_reach_the_store_live_and_after_downtime(label_studio, tmp_path):
    models = tmp_path / "models"
    # No LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY: the address and token that /setup sends must serve.
    # TRAIN_EVERY=0: no label-count training jobs; this test is about the labels reaching the store.
    env = {"WEB_WORKERS": "1", "SYNC_CHECK_INTERVAL": "0", "TRAIN_EVERY": "0"}
    project = label_studio.create_project("corrections e2e", TOPIC_CONFIG)
    project_id = project["id"]
    task_ids = label_studio.import_tasks(project_id, [{"text": f"news item number {i}"} for i in range(45)])

    backend = BackendServer(models, env=env).start()
    try:
        ml_id = connect(label_studio, project_id, backend)
        key = requests.get(f"{backend.url}/projects", timeout=10).json()["projects"][0]["key"]
        assert key.startswith(f"{project_id}.")

        # live: created, updated, deleted through Label Studio's API
        made = [label_studio.create_annotation(task_ids[i], choices(LABELS[i % 4]))["id"] for i in range(5)]
        label_studio.update_annotation(made[0], choices("Sci/Tech"))
        label_studio.delete_annotation(made[1])
        assert stored_labels(backend, key) == {
            made[0]: ("Sci/Tech",),
            made[2]: ("Business",),
            made[3]: ("Sci/Tech",),
            made[4]: ("World",),
        }
        assert (summary(backend, key)["annotations"], summary(backend, key)["deleted"]) == (4, 1)

        # behind while running: the webhook is off for two annotations; the next event's project
        # count gives it away and a background sync catches up
        hook = next(h for h in label_studio.webhooks(project_id) if h["url"].startswith(backend.url))
        label_studio.request("PATCH", f"/api/webhooks/{hook['id']}", json={"is_active": False})
        missed = [label_studio.create_annotation(task_ids[i], choices("Sports"))["id"] for i in (5, 6)]
        label_studio.request("PATCH", f"/api/webhooks/{hook['id']}", json={"is_active": True})
        label_studio.create_annotation(task_ids[7], choices("World"))
        wait_for(lambda: (summary(backend, key)["last_sync"] or {}).get("reason") == "behind Label Studio",
                 timeout=60, what="the catch-up sync", log=backend.log)
        assert set(missed) <= set(stored_labels(backend, key))
        assert stored_labels(backend, key) == ls_annotations(label_studio, project_id)
    finally:
        backend.stop()

    # down: 30 more annotations, one update and one delete that the backend never hears about
    offline = [label_studio.create_annotation(task_ids[10 + i], choices(LABELS[i % 4]))["id"] for i in range(30)]
    label_studio.update_annotation(made[2], choices("World"))
    label_studio.delete_annotation(made[3])
    expected = label_studio.project(project_id)["total_annotations_number"]
    assert expected == 7 - 1 + 30

    backend = BackendServer(models, env=env, port=backend.port).start()  # where Label Studio knows it
    try:
        assert summary(backend, key)["annotations"] == 7
        # the command line, with the bare project id: the store is brought level, counted exactly
        cli = subprocess.run(
            console_script() + ["sync", "--project", str(project_id)],
            env=backend.env, capture_output=True, text=True, timeout=300,
        )
        assert cli.returncode == 0, cli.stderr
        report = json.loads(cli.stdout)
        assert (report["inserted"], report["updated"], report["deleted"], report["unchanged"]) == (30, 1, 1, 5)
        assert report["label_studio_annotations"] == report["stored_annotations"] == expected
        labels = stored_labels(backend, key)
        assert labels == ls_annotations(label_studio, project_id)
        assert labels[made[2]] == ("World",) and made[3] not in labels
        assert all(labels[offline[i]] == (LABELS[i % 4],) for i in range(30))
        assert summary(backend, key)["last_sync"]["reason"] == "ls-backend sync"

        # a sync whose labels cannot queue their training (the queue's Redis down) reports what it stored
        # (it failed with the Redis error alone, though the labels were in the store)
        label_studio.request("PATCH", f"/api/webhooks/{hook['id']}", json={"is_active": False})
        unheard = label_studio.create_annotation(task_ids[41], choices("Sports"))["id"]
        label_studio.request("PATCH", f"/api/webhooks/{hook['id']}", json={"is_active": True})
        down = subprocess.run(
            console_script() + ["sync", "--project", str(project_id)],
            env={**backend.env, "REDIS_URL": "redis://127.0.0.1:9/0", "TRAIN_EVERY": "1"}, capture_output=True,
            text=True, timeout=300,
        )
        assert down.returncode == 0, down.stderr
        report = json.loads(down.stdout)
        assert report["inserted"] == 1 and report["queued_job"] is None and "REDIS_URL" in report["queue_error"]
        assert unheard in stored_labels(backend, key)

        # START_TRAINING: changes the backend did not hear about are fetched in the background
        label_studio.request("PATCH", f"/api/webhooks/{hook['id']}", json={"is_active": False})
        late = label_studio.create_annotation(task_ids[40], choices("Business"))["id"]
        label_studio.delete_annotation(offline[0])
        label_studio.request("PATCH", f"/api/webhooks/{hook['id']}", json={"is_active": True})
        label_studio.train(ml_id)
        wait_for(lambda: stored_labels(backend, key) == ls_annotations(label_studio, project_id),
                 timeout=90, what="the START_TRAINING sync", log=backend.log)
        assert late in stored_labels(backend, key) and offline[0] not in stored_labels(backend, key)
        wait_for(lambda: summary(backend, key)["last_sync"]["reason"] == "START_TRAINING",
                 what="the START_TRAINING sync report", log=backend.log)
    finally:
        backend.stop()


def test_a_backend_connected_to_a_labeled_project_learns_all_of_it(label_studio, tmp_path):
    count = 1000
    project_id = label_studio.create_project("already labeled", TOPIC_CONFIG)["id"]
    label_studio.request(  # one bulk import of pre-annotated tasks
        "POST", f"/api/projects/{project_id}/import",
        json=[{"data": {"text": f"item {i}"}, "annotations": [{"result": choices(LABELS[i % 4])}]}
              for i in range(count)],
    )
    backend = BackendServer(tmp_path / "models", env={"WEB_WORKERS": "1", "TRAIN_EVERY": "0"}).start()
    try:
        connect(label_studio, project_id, backend)  # /setup: the store is found behind
        key = requests.get(f"{backend.url}/projects/{project_id}", timeout=10).json()["key"]
        report = wait_for(lambda: summary(backend, key)["last_sync"], timeout=120, what="the backfill",
                          log=backend.log)
        assert (report["reason"], report["inserted"], report["stored_annotations"]) == ("behind Label Studio", count, count)
        labels = stored_labels(backend, key)
        assert len(labels) == count and sorted(set(labels.values())) == sorted((label,) for label in LABELS)
    finally:
        backend.stop()


def test_a_new_task_under_the_id_of_a_deleted_one_keeps_its_labels(label_studio, tmp_path):
    """Label Studio on SQLite gives the next task the id of the last one deleted: the store took every
    label on that new task for a late event of the deleted one, and dropped it."""
    env = {"WEB_WORKERS": "1", "SYNC_CHECK_INTERVAL": "0", "TRAIN_EVERY": "0"}
    project_id = label_studio.create_project("reused task ids e2e", TOPIC_CONFIG)["id"]
    task_ids = label_studio.import_tasks(project_id, [{"text": f"news item number {i}"} for i in range(3)])
    backend = BackendServer(tmp_path / "models", env=env).start()
    try:
        connect(label_studio, project_id, backend)
        key = requests.get(f"{backend.url}/projects", timeout=10).json()["projects"][0]["key"]
        first = label_studio.create_annotation(task_ids[-1], choices("World"))["id"]
        assert stored_labels(backend, key) == {first: ("World",)}
        # the Data Manager's "Delete tasks" (it sends TASKS_DELETED), then a new import
        label_studio.request("POST", "/api/dm/actions", params={"id": "delete_tasks", "project": project_id},
                             json={"selectedItems": {"all": False, "included": [task_ids[-1]]}})
        wait_for(lambda: stored_labels(backend, key) == {}, timeout=30, what="the deletion", log=backend.log)
        reused = label_studio.import_tasks(project_id, [{"text": "a new task"}])[0]
        assert reused == task_ids[-1]  # what Label Studio does on SQLite (else this test has nothing to show)
        second = label_studio.create_annotation(reused, choices("Sports"))["id"]
        assert stored_labels(backend, key) == {second: ("Sports",)}
        assert stored_labels(backend, key) == ls_annotations(label_studio, project_id)
    finally:
        backend.stop()
