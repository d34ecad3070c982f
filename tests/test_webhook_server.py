"""Webhooks against the real running server (``ls-backend serve``, two gunicorn workers, SQLite)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from ls_backend.labeling import plan_for
from ls_backend.store import CorrectionStore
from tests.support.backend import BackendServer
from tests.support.events import TOPIC_CONFIG, annotation_event, choices, key_of, project

TOPIC = plan_for(TOPIC_CONFIG).control("topic")


def open_store(server: BackendServer) -> CorrectionStore:
    return CorrectionStore(f"sqlite:///{server.model_dir / 'store.sqlite'}")


def test_200_concurrent_webhooks_are_all_stored(backend):
    proj = project(7001)
    events = [annotation_event(70_000 + i, 70_000 + i, choices("World" if i % 2 else "Sports"), proj=proj)
              for i in range(200)]
    local = threading.local()

    def send(event: dict) -> int:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        return session.post(backend.url + "/webhook", json=event, timeout=30, auth=backend.auth).status_code

    with ThreadPoolExecutor(max_workers=50) as pool:
        statuses = list(pool.map(send, events))
    assert statuses == [200] * 200

    store = open_store(backend)
    try:
        examples = store.training_examples(key_of(7001), TOPIC)
        assert sorted(e.task_id for e in examples) == [70_000 + i for i in range(200)]
        assert store.stored_annotations(key_of(7001)) == 200
    finally:
        store.close()
    summary = requests.get(f"{backend.url}/projects/{key_of(7001)}", auth=backend.auth, timeout=10).json()
    assert summary["annotations"] == 200 and summary["labels"]["topic"]["World"] == 100


def test_malformed_webhooks_get_4xx_json_from_the_server(backend):
    response = requests.post(backend.url + "/webhook", json={"action": "ANNOTATION_CREATED"}, auth=backend.auth,
                             timeout=10)
    assert response.status_code == 400
    assert "names no project" in response.json()["message"]
    response = requests.post(backend.url + "/webhook", data=b"\xff\xfe", auth=backend.auth, timeout=10,
                             headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500 and response.json()["error"]


def test_every_acknowledged_event_survives_a_sigkill(tmp_path):
    server = BackendServer(tmp_path / "models", env={"WEB_WORKERS": "2"}).start()
    proj = project(7002)
    acked: list[int] = []
    lock = threading.Lock()
    stop = threading.Event()
    counter = iter(range(1, 1_000_000))

    def sender() -> None:
        session = requests.Session()
        while not stop.is_set():
            with lock:
                annotation_id = next(counter)
            event = annotation_event(annotation_id, annotation_id, choices("Business"), proj=proj)
            try:
                response = session.post(server.url + "/webhook", json=event, timeout=5)
            except requests.RequestException:
                return  # the server is gone: this event was never acknowledged
            if 200 <= response.status_code < 300:
                with lock:
                    acked.append(annotation_id)

    threads = [threading.Thread(target=sender) for _ in range(16)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while len(acked) < 150 and time.monotonic() < deadline:
        time.sleep(0.01)
    server.kill()  # SIGKILL to the whole process group, mid-burst
    stop.set()
    for thread in threads:
        thread.join(timeout=10)
    assert len(acked) >= 150

    restarted = BackendServer(tmp_path / "models", env={"WEB_WORKERS": "2"}).start()
    try:
        store = open_store(restarted)
        try:
            stored = {e.annotation_id for e in store.training_examples(key_of(7002), TOPIC)}
            with store.engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA quick_check").scalar() == "ok"
        finally:
            store.close()
        assert set(acked) <= stored, f"{len(set(acked) - stored)} acknowledged events lost"
        summary = requests.get(f"{restarted.url}/projects/7002", timeout=10).json()
        assert summary["annotations"] == len(stored)
    finally:
        restarted.stop()
