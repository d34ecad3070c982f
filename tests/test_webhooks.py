"""The /webhook route, /setup bookkeeping and the operator view, through the Flask app."""

from __future__ import annotations

import base64
import logging

import pytest

from ls_backend.api import create_app
from ls_backend.predictor import Predictor
from tests.support.events import TOPIC_CONFIG, annotation_event, choices, deleted_event, key_of, project

KEY = key_of(3)


def test_an_annotation_event_is_stored_before_the_answer(client, app):
    response = client.post("/webhook", json=annotation_event(1, 10, choices("World")))
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok", "action": "ANNOTATION_CREATED", "project": KEY, "changed": 1}
    store = app.extensions["ls_backend"].store
    assert [e.labels for e in store.training_examples(KEY, _topic())] == [("World",)]


def test_deletes_and_replays_through_the_route(client):
    client.post("/webhook", json=annotation_event(1, 10, choices("World")))
    assert client.post("/webhook", json=deleted_event(1)).get_json()["changed"] == 1
    assert client.post("/webhook", json=annotation_event(1, 10, choices("World"))).get_json()["changed"] == 0
    summary = client.get(f"/projects/{KEY}").get_json()
    assert (summary["annotations"], summary["deleted"]) == (0, 1)


@pytest.mark.parametrize(
    "body, fragment",
    [
        (b"", "empty body"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"annotation": {}}', "action"),
        (b'{"action": "ANNOTATION_CREATED", "annotation": {"id": 1}}', "names no project"),
        (b'{"action": "ANNOTATIONS_DELETED", "annotations": [{"x": 1}], '
         b'"project": {"id": 3, "created_at": "2026-11-27T00:54:22.448107Z"}}', "has no 'id'"),
    ],
)
def test_malformed_payloads_get_4xx_json_and_nothing_is_stored(client, body, fragment):
    response = client.post("/webhook", data=body, content_type="application/json")
    assert 400 <= response.status_code < 500
    payload = response.get_json()
    assert payload["error"] == "bad_request" and fragment in payload["message"]
    assert client.get("/projects").get_json()["projects"] == []


def test_other_actions_get_200(client, caplog):
    with caplog.at_level(logging.DEBUG, logger="ls_backend.store"):
        response = client.post("/webhook", json={"action": "LABEL_LINK_DELETED", "label_link": {"id": 4}})
    assert response.status_code == 200 and response.get_json()["changed"] == 0
    assert "LABEL_LINK_DELETED" in caplog.text


def test_listeners_hear_each_stored_event_and_cannot_break_the_webhook(client, app, caplog):
    heard = []
    listeners = app.extensions["ls_backend"].event_listeners

    def broken(outcome):
        raise RuntimeError("listener bug")

    listeners[:] = [broken, heard.append]
    with caplog.at_level(logging.ERROR):
        response = client.post("/webhook", json={"action": "START_TRAINING", "project": project()})
    assert response.status_code == 200
    assert [(o.action, o.project_key, o.trigger) for o in heard] == [("START_TRAINING", KEY, True)]
    assert "listener bug" in caplog.text


def test_operator_view(client):
    client.post("/webhook", json=annotation_event(1, 10, choices("World")))
    client.post("/webhook", json=annotation_event(2, 11, choices("Sports")))
    listing = client.get("/projects").get_json()
    assert [p["key"] for p in listing["projects"]] == [KEY]
    assert listing["store"].startswith("sqlite:///")
    detail = client.get("/projects/3").get_json()  # a bare Label Studio id where it is unambiguous
    assert detail["labels"]["topic"] == {"World": 1, "Sports": 1, "Business": 0, "Sci/Tech": 0}
    assert detail["labels_since_training"] == 2 and detail["last_event_at"]
    missing = client.get("/projects/42")
    assert missing.status_code == 404 and "no project '42'" in missing.get_json()["message"]


def test_setup_remembers_the_token_without_logging_it(settings, encoder, caplog):
    app = create_app(settings.with_overrides(sync_check_interval=0), Predictor(settings, encoder=encoder))
    client = app.test_client()
    with caplog.at_level(logging.DEBUG):
        response = client.post("/setup", json={"project": KEY, "schema": TOPIC_CONFIG,
                                               "hostname": "http://localhost:8080", "access_token": "tok-very-secret"})
    assert response.status_code == 200
    store = app.extensions["ls_backend"].store
    assert store.connection_of(KEY) == ("http://localhost:8080", "tok-very-secret")
    assert "tok-very-secret" not in caplog.text
    assert "tok-very-secret" not in client.get("/projects").get_data(as_text=True)


def test_with_basic_auth_an_unauthenticated_webhook_gets_401_and_nothing_is_stored(settings, encoder):
    secured = settings.with_overrides(basic_auth_user="ls", basic_auth_pass="pw")
    app = create_app(secured, Predictor(secured, encoder=encoder))
    client = app.test_client()
    refused = client.post("/webhook", json=annotation_event(1, 10, choices("World")))
    assert refused.status_code == 401 and "PATCH /api/webhooks" in refused.get_json()["message"]
    header = {"Authorization": "Basic " + base64.b64encode(b"ls:pw").decode()}
    assert client.get("/projects", headers=header).get_json()["projects"] == []
    accepted = client.post("/webhook", json=annotation_event(1, 10, choices("World")), headers=header)
    assert accepted.status_code == 200 and accepted.get_json()["changed"] == 1


def _topic():
    from ls_backend.labeling import plan_for

    return plan_for(TOPIC_CONFIG).control("topic")
