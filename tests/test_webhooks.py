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


@pytest.mark.parametrize("body", [{"action": "ANNOTATIONS_DELETED"}, {"action": "TASKS_DELETED"},
                                  {"action": "ANNOTATIONS_DELETED", "annotations": []}])
def test_a_deletion_that_found_nothing_to_delete_is_no_bad_request(client, body):
    """Label Studio's Data Manager sends "Delete Annotations" on tasks without annotations as the action
    alone (no project, no ids): it was answered 400 "names no project" for a normal action."""
    response = client.post("/webhook", json=body)
    assert response.status_code == 200 and response.get_json()["changed"] == 0
    assert client.get("/projects").get_json()["projects"] == []
    # ids without a project could lose a deletion: still refused
    response = client.post("/webhook", json={"action": body["action"], "annotations": [{"id": 1}], "tasks": [{"id": 1}]})
    assert response.status_code == 400 and "names no project" in response.get_json()["message"]


@pytest.mark.parametrize(
    "body, fragment",
    [
        (b"", "empty body"),
        (b"{not json", "not valid JSON"),
        (b"[" * 100_000, "nested too deeply"),  # past the JSON parser's recursion limit
        (b"[1, 2]", "JSON object"),
        (b'{"annotation": {}}', "action"),
        (b'{"action": "ANNOTATION_CREATED", "annotation": {"id": 1}}', "names no project"),
        (b'{"action": "ANNOTATIONS_DELETED", "annotations": [{"x": 1}], '
         b'"project": {"id": 3, "created_at": "2026-11-27T00:54:22.448107Z"}}', "has no 'id'"),
        # ids that are lists cannot name a task
        (b'{"action": "ANNOTATIONS_CREATED", "annotation": [{"id": 1, "task": [1], "result": []}], '
         b'"task": [{"id": [1]}], "project": {"id": 3, "created_at": "2026-11-27T00:54:22.448107Z"}}', "task"),
    ],
)
def test_malformed_payloads_get_4xx_json_and_nothing_is_stored(client, body, fragment):
    response = client.post("/webhook", data=body, content_type="application/json")
    assert 400 <= response.status_code < 500
    payload = response.get_json()
    assert payload["error"] == "bad_request" and fragment in payload["message"]
    assert client.get("/projects").get_json()["projects"] == []


@pytest.mark.parametrize("flag", ["was_cancelled", "ground_truth"])
def test_true_false_fields_are_read_as_booleans_and_anything_else_is_a_400(client, app, flag):
    store = app.extensions["ls_backend"].store
    event = annotation_event(1, 10, choices("World"))
    event["annotation"][flag] = "false"  # text, not a JSON boolean: "false" is still false
    assert client.post("/webhook", json=event).status_code == 200
    assert [e.labels for e in store.training_examples(KEY, _topic())] == [("World",)]
    assert client.get(f"/projects/{KEY}").get_json()["cancelled"] == 0
    for value in ("maybe", 2, [True], {"x": 1}):
        event = annotation_event(2, 11, choices("Sports"), updated=1)
        event["annotation"][flag] = value
        response = client.post("/webhook", json=event)
        assert response.status_code == 400, value
        assert f"'{flag}' must be true or false" in response.get_json()["message"]
    assert [e.labels for e in store.training_examples(KEY, _topic())] == [("World",)]  # nothing half-stored
    event = annotation_event(1, 10, choices("World"), updated=2)
    event["annotation"]["was_cancelled"] = "True"
    assert client.post("/webhook", json=event).get_json()["changed"] == 1
    assert client.get(f"/projects/{KEY}").get_json()["cancelled"] == 1  # a skip, as Label Studio's true


def test_request_errors_name_their_status_and_what_to_fix(client):
    response = client.post("/setup", data=b"null", content_type="application/json")
    assert response.status_code == 400 and "must be a JSON object, not null" in response.get_json()["message"]
    for schema, fragment in (("", "'schema' is empty"), ("  ", "'schema' is empty"), ([], "must be a string"),
                             ({}, "must be a string"), (0, "must be a string"), (False, "must be a string")):
        response = client.post("/setup", json={"project": KEY, "schema": schema})
        assert response.status_code == 400 and fragment in response.get_json()["message"], schema
    response = client.post("/setup", json={"project": KEY})
    assert "missing field 'label_config' (or 'schema'" in response.get_json()["message"]
    for number in (1.5, float("nan"), float("-inf"), 3.1732665260):  # a fraction loses digits: text only
        response = client.post("/setup", json={"project": number, "schema": TOPIC_CONFIG})
        assert response.status_code == 400 and "must be a string" in response.get_json()["message"], number
    assert client.get("/projects").get_json()["projects"] == []
    assert client.post("/setup", json={"project": 3, "schema": TOPIC_CONFIG}).status_code == 200  # a whole id
    missing = client.get("/projects/999")
    assert (missing.status_code, missing.get_json()["error"]) == (404, "not_found")
    many = client.post("/predict", json={"project": KEY, "label_config": TOPIC_CONFIG, "tasks": [{}] * 10_001})
    assert (many.status_code, many.get_json()["error"]) == (413, "request_entity_too_large")


def test_a_bare_id_naming_two_projects_is_a_400_asking_for_the_full_key(client, app):
    for created in ("2026-11-27T00:54:22.448107Z", "2025-01-02T03:04:05Z"):
        event = annotation_event(1, 10, choices("World"), proj=project(3, created_at=created))
        assert client.post("/webhook", json=event).status_code == 200
    for path in ("/projects/3", "/projects/3/versions"):
        response = client.get(path)
        assert response.status_code == 400 and "ambiguous" in response.get_json()["message"], path
        assert "pass the full key" in response.get_json()["message"]
    # one of them has versions: still ambiguous (the operator's command went to that one before)
    first = key_of(3, "2026-11-27T00:54:22.448107Z")
    assert client.post("/setup", json={"project": first, "schema": TOPIC_CONFIG}).status_code == 200
    response = client.get("/projects/3/versions")
    assert response.status_code == 400 and "ambiguous" in response.get_json()["message"]
    # two projects with versions and no labels (the registry alone knows them)
    for created in ("2026-11-27T00:54:22.448107Z", "2025-01-02T03:04:05Z"):
        assert client.post("/setup", json={"project": key_of(4, created), "schema": TOPIC_CONFIG}).status_code == 200
    response = client.get("/projects/4/versions")
    assert response.status_code == 400 and "pass the full key" in response.get_json()["message"]
    assert client.get(f"/projects/{first}/versions").get_json()["current"] == "p3-v0"
    # the store knows one project of the id and the registry another (it reached the registry by /predict
    # alone, or the store moved to a new DATABASE_URL): ambiguous, not the store's picked
    stored, unstored = key_of(5, "2026-11-27T00:54:22.448107Z"), key_of(5, "2025-01-02T03:04:05Z")
    assert client.post("/webhook", json=annotation_event(2, 20, choices("World"), proj=project(5))).status_code == 200
    app.extensions["ls_backend"].predictor.setup(unstored, TOPIC_CONFIG)
    response = client.post("/projects/5/pin", json={})
    assert response.status_code == 400 and "pass the full key" in response.get_json()["message"]
    assert app.extensions["ls_backend"].registry.pinned(unstored) is None
    assert client.get(f"/projects/{stored}").get_json()["key"] == stored


def test_a_bulk_event_with_a_malformed_entry_stores_the_others_and_answers_400_naming_it(client, app):
    heard = []
    app.extensions["ls_backend"].event_listeners.append(heard.append)
    events = [annotation_event(i, 10 + i, choices("Sports")) for i in (1, 2, 3)]
    events[1]["annotation"].update(updated_at="soon", created_at=None)
    response = client.post("/webhook", json={"action": "ANNOTATIONS_CREATED", "project": project(),
                                             "annotation": [e["annotation"] for e in events],
                                             "task": [e["task"] for e in events]})
    assert response.status_code == 400
    body = response.get_json()
    assert (body["status"], body["error"], body["changed"], body["project"]) == ("partial", "bad_request", 2, KEY)
    assert body["rejected"] == ["annotation[1]: annotation 2: 'updated_at' is missing or not an ISO-8601 time"]
    assert body["rejected_count"] == 1
    assert "1 malformed entries were not stored (the others were)" in body["message"]
    store = app.extensions["ls_backend"].store
    assert sorted(e.task_id for e in store.training_examples(KEY, _topic())) == [11, 13]
    assert [o.changed for o in heard] == [2]  # training hears of the stored ones


def test_a_blank_action_is_named_as_missing(client):
    response = client.post("/webhook", json={"action": "  ", "project": project()})
    assert response.status_code == 400
    assert response.get_json()["message"] == "missing field 'action' (a Label Studio webhook event name)"


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
        response = client.post("/webhook", json=annotation_event(1, 10, choices("World")))
    assert response.status_code == 200 and response.get_json()["changed"] == 1  # the next label catches up
    assert [(o.action, o.project_key) for o in heard] == [("ANNOTATION_CREATED", KEY)]
    assert "listener bug" in caplog.text


def test_a_start_training_that_cannot_be_queued_answers_503_and_is_still_stored(settings, encoder):
    """Redis down, for real: a port nothing listens on."""
    import socket

    with socket.socket() as probe:  # a free port, closed again: connections to it are refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    down = settings.with_overrides(redis_url=f"redis://127.0.0.1:{port}/0")
    app = create_app(down, Predictor(down, encoder=encoder))
    client = app.test_client()
    svc = app.extensions["ls_backend"]
    heard = []
    svc.event_listeners.append(heard.append)
    response = client.post("/webhook", json={"action": "START_TRAINING", "project": project()})
    body = response.get_json()
    assert response.status_code == 503 and "Start Training could not be queued" in body["message"]
    assert "ConnectionError" in body["message"] and "press Start Training again" in body["message"]
    assert [(o.action, o.project_key, o.trigger) for o in heard] == [("START_TRAINING", KEY, True)]
    # a label whose job cannot be queued is still stored and answered 200: the next label queues it
    label = client.post("/webhook", json=annotation_event(1, 10, choices("World")))
    assert label.status_code == 200 and label.get_json()["changed"] == 1
    # the job routes say the queue is down, not that there is no such job, nor a server fault
    for method, path in (("get", "/jobs/train-3_1-0123456789ab"), ("get", "/jobs"), ("post", f"/projects/{KEY}/train")):
        answer = getattr(client, method)(path)
        assert answer.status_code == 503, (path, answer.get_json())
        assert answer.get_json()["error"] == "queue_unavailable" and "REDIS_URL" in answer.get_json()["message"]
    # waiting on a job reads again until its deadline, then says why it gave up (not "no job")
    from redis.exceptions import ConnectionError as RedisConnectionError

    with pytest.raises(RedisConnectionError):
        svc.queue.wait("train-3_1-0123456789ab", timeout=1, poll=0.1)


def test_only_the_training_queue_failing_makes_start_training_a_503(client, app):
    """Another listener's failure (the sync's, say) does not hide a job that was queued."""
    app.extensions["ls_backend"].event_listeners.insert(0, lambda outcome: 1 / 0)
    assert client.post("/webhook", json={"action": "START_TRAINING", "project": project()}).status_code == 200
    jobs = client.get("/jobs").get_json()["jobs"]
    assert [(j["project"], j["trigger"]) for j in jobs] == [(KEY, "START_TRAINING")], jobs


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


def test_a_new_address_without_a_token_of_its_own_never_gets_the_stored_token(settings, encoder):
    app = create_app(settings.with_overrides(sync_check_interval=0), Predictor(settings, encoder=encoder))
    client = app.test_client()
    store = app.extensions["ls_backend"].store
    owner = {"project": KEY, "schema": TOPIC_CONFIG, "hostname": "http://localhost:8080", "access_token": "tok-owner"}
    assert client.post("/setup", json=owner).status_code == 200
    # the same address again, with or without a trailing slash or a token: nothing changes
    client.post("/setup", json={"project": KEY, "schema": TOPIC_CONFIG, "hostname": "http://localhost:8080/"})
    assert store.connection_of(KEY) == ("http://localhost:8080", "tok-owner")
    # another address and no token: the owner's token is not kept for it
    client.post("/setup", json={"project": KEY, "schema": TOPIC_CONFIG, "hostname": "http://elsewhere:9999"})
    assert store.connection_of(KEY) == ("http://elsewhere:9999", None)
    # Label Studio itself sends both: a move with its token is remembered whole
    assert client.post("/setup", json={**owner, "hostname": "http://moved:8080"}).status_code == 200
    assert store.connection_of(KEY) == ("http://moved:8080", "tok-owner")


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


def test_odd_but_valid_json_text_is_stored_and_read_back_exactly(client, app):
    """A lone UTF-16 surrogate is valid JSON, yet UTF-8 cannot hold it; a NUL cannot go in a
    PostgreSQL text column. Neither may cost an annotation."""
    text = "bad \ud800 half of a pair, and a \x00 NUL"
    event = annotation_event(1, 10, choices("World"), text=text)
    event["project"] = {**event["project"], "title": "odd \udfff\x00 title", "total_annotations_number": 10**30}
    event["annotation"]["completed_by"] = "\ud83d"
    response = client.post("/webhook", json=event)
    assert response.status_code == 200 and response.get_json()["changed"] == 1, response.get_json()
    store = app.extensions["ls_backend"].store
    assert [(e.text, e.labels) for e in store.training_examples(KEY, _topic())] == [(text, ("World",))]
    assert client.get(f"/projects/{KEY}").status_code == 200


def test_a_lone_surrogate_fails_neither_its_task_nor_the_batch(client):
    tasks = [{"id": 1, "data": {"text": "Stocks rally as \ud800 markets rise"}}, {"id": 2, "data": {"text": "Goal!"}}]
    response = client.post("/predict", json={"tasks": tasks, "project": KEY, "label_config": TOPIC_CONFIG})
    assert response.status_code == 200, response.get_json()
    results = response.get_json()["results"]
    assert len(results) == 2 and all(r["result"] for r in results)


@pytest.mark.parametrize("path, fragment", [
    ("/projects/\u00b2", "no project"),  # "²".isdigit() is true, int("²") fails
    ("/projects/3/next?n=\u00b2", "'n'"),
    ("/jobs?limit=\u00b2", "'limit'"),
    ("/versions?project=..", "'project'"),
])
def test_odd_query_values_are_4xx_not_500(client, path, fragment):
    client.post("/webhook", json=annotation_event(1, 10, choices("World")))  # project 3 exists
    response = client.get(path)
    assert 400 <= response.status_code < 500 and fragment in response.get_json()["message"], response.get_json()


@pytest.mark.parametrize("key", ["..", "...", "3.1\x00", "\ud800", "7." + "1" * 119,  # past what a folder name keeps
                                 str(2**70) + ".1732665262", 2**70,  # ids past the store's 64-bit column
                                 "my project.1", "a!b"])  # would share a folder with "my_project.1", "a?b"
def test_an_unusable_project_key_is_a_400(client, key):
    for route, body in (("/setup", {"project": key, "schema": TOPIC_CONFIG}),
                        ("/predict", {"project": key, "label_config": TOPIC_CONFIG, "tasks": []})):
        response = client.post(route, json=body)
        assert response.status_code == 400 and "'project'" in response.get_json()["message"], response.get_json()


def test_basic_auth_with_non_ascii_credentials(settings, encoder):
    secured = settings.with_overrides(basic_auth_user="josé", basic_auth_pass="pässwort")
    client = create_app(secured, Predictor(secured, encoder=encoder)).test_client()

    def basic(raw: bytes) -> dict:
        return {"Authorization": "Basic " + base64.b64encode(raw).decode()}

    assert client.get("/projects", headers=basic("josé:pässwort".encode())).status_code == 200
    assert client.get("/projects", headers=basic("josé:passwort".encode())).status_code == 401
    assert client.get("/projects", headers=basic(b"\xff\xfe:x")).status_code == 401
    assert client.get("/projects", headers={"Authorization": "Basic \u00e9t\u00e9"}).status_code == 401


def _topic():
    from ls_backend.labeling import plan_for

    return plan_for(TOPIC_CONFIG).control("topic")


def test_operator_routes_answer_4xx_for_ids_and_limits_out_of_range(client):
    for path in ("/projects/99999999999999999999999", "/projects/%00", "/jobs?project=%00"):
        response = client.get(path)
        assert 400 <= response.status_code < 500 and response.get_json()["message"], path
    for limit in ("99999999999999999999999", "0"):
        response = client.get(f"/jobs?limit={limit}")
        assert response.status_code == 400 and "1 to 10000" in response.get_json()["message"]


def test_pin_and_rollback_answer_4xx_for_version_names_the_file_system_refuses(client, app):
    assert client.post("/setup", json={"project": KEY, "schema": TOPIC_CONFIG}).status_code == 200
    # no version can have these names: the request's fault (400, "bad version name")
    for name in ("p3-v0\u0000", "\ud800", "a" * 300, "p3-v" + "9" * 250, "a/b", "p3-v1/../p3-v0"):
        for path, body in (("pin", {"version": name}), ("rollback", {"to": name})):
            response = client.post(f"/projects/{KEY}/{path}", json=body)
            assert response.status_code == 400, (path, name[:10], response.status_code)
            assert response.get_json()["error"] == "bad_request"
            assert "bad version name" in response.get_json()["message"]
    # a name of the right form that the file system refuses (over 255 bytes) names no version: 404
    for path, body in (("pin", {"version": "é" * 190 + "-v1"}), ("rollback", {"to": "é" * 190 + "-v1"})):
        response = client.post(f"/projects/{KEY}/{path}", json=body)
        assert response.status_code == 404 and response.get_json()["error"] == "not_found", path
    # a version whose meta.json is unreadable is not served, and says so
    registry = app.extensions["ls_backend"].registry
    served = registry.current(KEY)
    (registry.version_dir(KEY, served) / "meta.json").write_text("{torn")
    response = client.post(f"/projects/{KEY}/pin", json={"version": served})
    assert response.status_code == 404 and response.get_json()["error"] == "not_found"


def test_json_sent_with_a_form_content_type_is_read_as_json(client, app):
    """curl -d sends application/x-www-form-urlencoded; the body is still the JSON event."""
    import json

    body = json.dumps(annotation_event(1, 10, choices("World")))
    response = client.post("/webhook", data=body, content_type="application/x-www-form-urlencoded")
    assert response.status_code == 200 and response.get_json()["changed"] == 1
    response = client.post("/setup", data=json.dumps({"project": KEY, "schema": TOPIC_CONFIG}),
                           content_type="application/x-www-form-urlencoded")
    assert response.status_code == 200
    response = client.post(f"/projects/{KEY}/rollback", data="", content_type="application/x-www-form-urlencoded")
    assert response.status_code == 409  # no body: roll back one step, and there is nothing to roll back to
    response = client.post(f"/projects/{KEY}/rollback", json={"to": ""})
    assert response.status_code == 409  # an empty name is the default, as for pin


def test_a_full_disk_while_pinning_is_the_servers_fault_not_an_unknown_version(client, monkeypatch):
    import errno

    from ls_backend import registry as registry_module

    assert client.post("/setup", json={"project": KEY, "schema": TOPIC_CONFIG}).status_code == 200

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(registry_module, "write_atomic", full)
    response = client.post(f"/projects/{KEY}/pin", json={})
    assert response.status_code == 500 and "No space left" in response.get_json()["message"]


def _two_versions(client, app) -> tuple[str, str]:
    """The project's cold start v0 and a copy promoted over it (v1)."""
    assert client.post("/setup", json={"project": KEY, "schema": TOPIC_CONFIG}).status_code == 200
    registry = app.extensions["ls_backend"].registry
    v0 = registry.current(KEY)
    loaded = registry.load(KEY, v0)
    v1 = registry.create_version(KEY, loaded.heads, dict(loaded.meta, parent=v0))
    registry.promote(KEY, v1)
    return v0, v1


def test_operator_routes_refuse_fields_they_do_not_read(client, app):
    """A mistyped field was dropped and the route did something else: ``{"version": ...}`` on rollback
    (pin's field) rolled back one step, ``{"to": ...}`` on pin pinned the current version, and
    ``{"lane": "fast"}`` on train queued a full-lane job."""
    v0, v1 = _two_versions(client, app)
    registry = app.extensions["ls_backend"].registry
    for path, body, named in (("rollback", {"version": v0}, "'to', 'pin'"), ("pin", {"to": v0}, "'version'"),
                              ("train", {"lanes": "fast"}, "'lane'")):
        response = client.post(f"/projects/{KEY}/{path}", json=body)
        assert response.status_code == 400, (path, response.get_json())
        assert "unknown field" in response.get_json()["message"] and named in response.get_json()["message"]
    assert (registry.current(KEY), registry.pinned(KEY)) == (v1, None)
    assert client.post(f"/projects/{KEY}/rollback", json={"pin": "yes"}).status_code == 400
    assert client.post(f"/projects/{KEY}/train", json={"lane": "slow"}).status_code == 400
    response = client.post(f"/projects/{KEY}/train", json={"lane": "fast"})
    assert response.status_code == 202 and response.get_json()["job"]["lane"] == "fast"
    # a GET on a POST route is a 405, not "no project '3/pin'"
    for path in ("pin", "rollback", "train"):
        assert client.get(f"/projects/{KEY}/{path}").status_code == 405, path


def test_a_rollback_or_a_pin_that_switches_versions_queues_a_refresh_for_label_studio(client, app):
    """Label Studio went on showing, and ordering tasks by, the version rolled away from until a job
    promoted another: nothing refreshed its predictions."""
    v0, v1 = _two_versions(client, app)
    queue = app.extensions["ls_backend"].queue
    response = client.post(f"/projects/{KEY}/rollback", json={"to": v0, "pin": True})
    body = response.get_json()
    assert response.status_code == 200 and (body["current"], body["pinned"]) == (v0, v0), body
    job = queue.get(body["refresh_job"])
    assert job.trigger == "refresh" and job.project == KEY
    versions = client.get(f"/projects/{KEY}/versions").get_json()
    assert (versions["current"], versions["pinned"]) == (v0, v0)
    # pinning the version that serves switches nothing: no refresh
    again = client.post(f"/projects/{KEY}/pin", json={}).get_json()
    assert again["pinned"] == v0 and "refresh_job" not in again
    assert client.delete(f"/projects/{KEY}/pin").get_json()["pinned"] is None
    switched = client.post(f"/projects/{KEY}/pin", json={"version": v1}).get_json()
    assert switched["current"] == v1 and switched["refresh_job"] == body["refresh_job"]  # joins the queued one


def test_basic_auth_takes_credentials_encoded_as_label_studio_sends_them(tmp_path, encoder):
    """Label Studio calls an ML backend through requests' HTTPBasicAuth, which encodes a password as
    Latin-1; curl and browsers send UTF-8. Only UTF-8 was accepted: /setup and /predict got 401."""
    from ls_backend.settings import Settings, SettingsError

    settings = Settings(model_dir=tmp_path / "models", max_length=128, basic_auth_user="ops", basic_auth_pass="päss")
    client = create_app(settings, Predictor(settings, encoder=encoder)).test_client()
    for encoding in ("latin-1", "utf-8"):
        token = base64.b64encode("ops:päss".encode(encoding)).decode()
        assert client.get("/health", headers={"Authorization": f"Basic {token}"}).status_code == 200, encoding
    wrong = base64.b64encode("ops:pass".encode()).decode()
    assert client.get("/health", headers={"Authorization": f"Basic {wrong}"}).status_code == 401
    # a user name with a colon can never match (the header splits at the first one): a bad setting
    with pytest.raises(SettingsError, match="BASIC_AUTH_USER"):
        Settings.from_env({"BASIC_AUTH_USER": "ops:team", "BASIC_AUTH_PASS": "x"})
