"""The protocol over real HTTP, against the server started as the README starts it."""

import base64

import pytest
import requests
import torch

from .conftest import TOPIC_CONFIG
from .support.backend import BackendServer
from .support.events import annotation_event, choices, project

PROJECT = "21.1732665262"


def test_health(backend):
    body = requests.get(backend.url + "/health", timeout=5).json()
    assert body["status"] == "UP" and body["model_class"] == "ls-backend"
    assert body["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # DEVICE=auto
    assert body["precision"] in {"fp32", "bf16", "fp16"}


def test_setup_predict_versions_round_trip(backend):
    setup = requests.post(backend.url + "/setup", json={"project": PROJECT, "schema": TOPIC_CONFIG}, timeout=10)
    assert setup.status_code == 200
    version = setup.json()["model_version"]
    assert isinstance(version, str) and version == "p21-v0"
    tasks = [{"id": i, "data": {"text": t}} for i, t in enumerate(["The Yankees beat the Red Sox in extra innings", "Stocks fell as oil prices and interest rates rose"])]
    response = requests.post(
        backend.url + "/predict",
        json={"tasks": tasks, "project": PROJECT, "label_config": TOPIC_CONFIG, "params": {"context": None}},
        timeout=30,
    )
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["model_version"] for r in results] == [version, version]
    assert results[0]["result"][0]["value"]["choices"] == ["Sports"]
    assert results[1]["result"][0]["value"]["choices"] == ["Business"]
    assert version in requests.get(backend.url + "/versions", timeout=5).json()["versions"]


@pytest.mark.parametrize("action", ["TASKS_CREATED", "LABEL_LINK_CREATED", "SOMETHING_NEW"])
def test_webhook_answers_200_for_every_action(backend, action):
    body = {"action": action, "project": {"id": 21, "created_at": "2024-11-27T00:01:02.448107Z"}}
    response = requests.post(backend.url + "/webhook", json=body, timeout=2)
    assert response.status_code == 200, response.text


def test_annotation_webhook_is_stored_and_a_malformed_one_is_a_json_400(backend):
    event = annotation_event(1, 1, choices("Sports"), text="The Lakers won", proj=project(22))
    stored = requests.post(backend.url + "/webhook", json=event, timeout=2)
    assert stored.status_code == 200 and stored.json()["changed"] == 1
    summary = requests.get(f"{backend.url}/projects/{stored.json()['project']}", timeout=5).json()
    assert summary["annotations"] == 1
    broken = requests.post(backend.url + "/webhook", json={"action": "ANNOTATION_CREATED", "project": project(22)}, timeout=2)
    assert broken.status_code == 400 and "annotation" in broken.json()["message"]


def test_malformed_json_over_http_is_a_json_400(backend):
    response = requests.post(backend.url + "/predict", data="{oops", headers={"Content-Type": "application/json"}, timeout=5)
    assert response.status_code == 400
    assert response.headers["Content-Type"].startswith("application/json")
    assert "not valid JSON" in response.json()["message"]
    import gzip  # a proxy or a client that compresses: said so, not "not valid JSON"
    packed = requests.post(backend.url + "/predict", data=gzip.compress(b'{"tasks": []}'),
                           headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}, timeout=5)
    assert packed.status_code == 400 and "Content-Encoding 'gzip'" in packed.json()["message"], packed.text
    missing = requests.get(backend.url + "/no-such-route", timeout=5)
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"


@pytest.fixture(scope="module")
def auth_backend(tmp_path_factory):
    root = tmp_path_factory.mktemp("auth")
    with BackendServer(root / "models", env={"BASIC_AUTH_USER": "ann", "BASIC_AUTH_PASS": "s3cret", "WEB_WORKERS": "1"}) as server:
        yield server


def test_basic_auth_guards_every_route(auth_backend):
    url = auth_backend.url
    for method, path in [("get", "/health"), ("post", "/setup"), ("post", "/predict"), ("get", "/versions")]:
        response = requests.request(method, url + path, json={}, timeout=5)
        assert response.status_code == 401, path
        assert response.json()["error"] == "unauthorized"
        assert response.headers["WWW-Authenticate"].startswith("Basic")
    wrong = requests.get(url + "/health", auth=("ann", "nope"), timeout=5)
    assert wrong.status_code == 401
    ok = requests.post(url + "/setup", json={"project": PROJECT, "schema": TOPIC_CONFIG}, auth=("ann", "s3cret"), timeout=10)
    assert ok.status_code == 200 and ok.json()["model_version"] == "p21-v0"


def test_unauthenticated_webhook_is_refused_with_the_fix(auth_backend):
    body = annotation_event(7, 7, choices("World"), text="Elections in Kenya", proj=project(21))
    refused = requests.post(auth_backend.url + "/webhook", json=body, timeout=2)
    assert refused.status_code == 401
    assert "PATCH /api/webhooks" in refused.json()["message"]
    header = "Basic " + base64.b64encode(b"ann:s3cret").decode()
    accepted = requests.post(auth_backend.url + "/webhook", json=body, headers={"Authorization": header}, timeout=2)
    assert accepted.status_code == 200
