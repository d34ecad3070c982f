"""Pre-labels from the first task on: the cold-start model through the Flask app."""

import numpy as np
import pytest
from label_studio_sdk.label_interface import LabelInterface

from ls_backend.registry import ModelRegistry

from .conftest import TOPIC_CONFIG
from .support.data import AGNEWS_LABELS, agnews

PROJECT = "7.1732665262"

MULTI_CONFIG = """<View><Text name="text" value="$body"/>
  <Choices name="tags" toName="text" choice="multiple">
    <Choice value="Sports" alias="sport"/><Choice value="Politics"/><Choice value="Technology" hint="computers and software"/>
  </Choices></View>"""


def predict(client, tasks, config=TOPIC_CONFIG, project=PROJECT):
    response = client.post("/predict", json={"tasks": tasks, "project": project, "label_config": config})
    assert response.status_code == 200, response.json
    return response.json["results"]


def test_cold_start_is_v0_and_results_validate(client):
    setup = client.post("/setup", json={"project": PROJECT, "schema": TOPIC_CONFIG})
    assert setup.status_code == 200 and setup.json == {"model_version": "p7-v0"}
    tasks = [{"id": i, "data": {"text": text}} for i, (text, _) in enumerate(agnews("test", 12))]
    results = predict(client, tasks)
    assert len(results) == len(tasks)
    interface = LabelInterface(TOPIC_CONFIG)
    for entry in results:
        assert entry["model_version"] == "p7-v0"
        (item,) = entry["result"]
        assert interface.validate_prediction({"result": entry["result"], "score": entry["score"]}), entry
        assert item["from_name"] == "topic" and item["to_name"] == "text" and item["type"] == "choices"
        assert len(item["value"]["choices"]) == 1 and item["value"]["choices"][0] in AGNEWS_LABELS
        assert 0.25 <= item["score"] <= 1.0  # a softmax over 4 labels never tops below 1/4
        assert entry["score"] == item["score"]


def test_zero_shot_is_well_above_chance(client):
    rows = agnews("test", 120, offset=200)
    results = predict(client, [{"id": i, "data": {"text": t}} for i, (t, _) in enumerate(rows)])
    predicted = [r["result"][0]["value"]["choices"][0] for r in results]
    accuracy = np.mean([p == gold for p, (_, gold) in zip(predicted, rows)])
    assert accuracy > 0.5, accuracy  # chance is 0.25; about 0.65 measured


def test_results_keep_task_order_whatever_the_lengths(client):
    texts = ["Stocks fell sharply on Wall Street as oil prices rose. " * 6, "Goal!", "NASA launches a new Mars rover"]
    tasks = [{"id": i, "data": {"text": t}} for i, t in enumerate(texts)]
    together = predict(client, tasks)
    alone = [predict(client, [task])[0] for task in tasks]
    for batched, single in zip(together, alone):  # padding may move the last digits only
        assert batched["result"][0]["value"] == single["result"][0]["value"]
        assert batched["score"] == pytest.approx(single["score"], abs=1e-4)


def test_bad_tasks_get_empty_results_not_a_failed_batch(client):
    good = {"id": 1, "data": {"text": "The Lakers won the NBA title"}}
    tasks = [
        good,
        {"id": 2, "data": {}},
        {"id": 3, "data": {"text": "   "}},
        {"id": 4, "data": {"text": 42}},
        {"id": 5},
        "not a task",
        {"id": 6, "data": {"text": "x" * 2_000_000}},  # huge: read up to MAX_LENGTH tokens
    ]
    results = predict(client, tasks)
    assert len(results) == len(tasks)
    assert results[0]["result"][0]["value"]["choices"] == ["Sports"]
    for entry in results[1:6]:
        assert entry["result"] == [] and entry["score"] == 0.0 and entry["model_version"] == "p7-v0"
    assert len(results[6]["result"]) == 1


def test_multiple_choice_emits_aliases_and_thresholded_choices(client):
    tasks = [
        {"id": 1, "data": {"body": "The striker scored twice as the team won the championship final"}},
        {"id": 2, "data": {"body": "The new laptop ships with faster software and a better chip"}},
    ]
    results = predict(client, tasks, MULTI_CONFIG, "8.1")
    interface = LabelInterface(MULTI_CONFIG)
    first, second = results
    assert "sport" in first["result"][0]["value"]["choices"]
    assert "Technology" in second["result"][0]["value"]["choices"]
    for entry in results:
        assert interface.validate_prediction({"result": entry["result"]})
        assert 0.0 <= entry["score"] <= 1.0


def test_label_config_change_makes_a_new_version(client, settings):
    assert client.post("/setup", json={"project": PROJECT, "schema": TOPIC_CONFIG}).json["model_version"] == "p7-v0"
    assert client.post("/setup", json={"project": PROJECT, "schema": TOPIC_CONFIG}).json["model_version"] == "p7-v0"
    grown = TOPIC_CONFIG.replace('<Choice value="World"/>', '<Choice value="World"/><Choice value="Health"/>')
    assert client.post("/setup", json={"project": PROJECT, "schema": grown}).json["model_version"] == "p7-v1"
    results = predict(client, [{"id": 1, "data": {"text": "A new vaccine cuts flu deaths, doctors say"}}], grown)
    assert results[0]["model_version"] == "p7-v1"
    assert results[0]["result"][0]["value"]["choices"] == ["Health"]
    registry = ModelRegistry(settings.model_dir)
    assert [v.name for v in registry.versions(PROJECT)] == ["p7-v0", "p7-v1"]
    assert registry.current(PROJECT) == "p7-v1"
    assert registry.versions(PROJECT)[1].meta["parent"] == "p7-v0"


def test_unsupported_config_still_answers_setup_and_empty_results(client):
    config = '<View><Image name="i" value="$img"/><RectangleLabels name="r" toName="i"><Label value="a"/></RectangleLabels></View>'
    setup = client.post("/setup", json={"project": "9.1", "schema": config})
    assert setup.status_code == 200 and setup.json["model_version"] == "p9-unsupported"
    results = predict(client, [{"id": 1, "data": {"img": "x.png"}}, {"id": 2, "data": {}}], config, "9.1")
    assert results == [{"result": [], "score": 0.0, "model_version": "p9-unsupported"}] * 2


def test_a_new_current_version_is_picked_up_without_restart(client, settings, app):
    client.post("/setup", json={"project": PROJECT, "schema": TOPIC_CONFIG})
    registry = ModelRegistry(settings.model_dir)
    loaded = registry.load(PROJECT, "p7-v0")
    head = loaded.heads["topic"]
    head.weight = head.weight[[1, 0, 2, 3]]  # swap World and Sports rows: a visibly different model
    name = registry.create_version(PROJECT, loaded.heads, dict(loaded.meta, parent="p7-v0", kind="test"))
    registry.promote(PROJECT, name)
    app.extensions["ls_backend"].predictor._serving[PROJECT].checked_at = -1e9  # past the check interval
    assert client.post("/setup", json={"project": PROJECT, "schema": TOPIC_CONFIG}).json["model_version"] == name
    result = predict(client, [{"id": 1, "data": {"text": "The Yankees beat the Red Sox"}}])[0]
    assert result["model_version"] == name
    assert result["result"][0]["value"]["choices"] == ["World"]


@pytest.mark.parametrize(
    "body, status, words",
    [
        (b"{not json", 400, "not valid JSON"),
        (b"", 400, "empty body"),
        (b"[1, 2]", 400, "JSON object"),
        (b'{"project": "1.1", "label_config": "<View/>"}', 400, "missing field 'tasks'"),
        (b'{"tasks": {"id": 1}, "project": "1.1", "label_config": "<View/>"}', 400, "must be a list"),
        (b'{"tasks": [], "label_config": "<View/>"}', 400, "'project'"),
        (b'{"tasks": [], "project": "1.1"}', 400, "label_config"),
        (b'{"tasks": [], "project": "1.1", "label_config": 5}', 400, "label config XML"),
    ],
)
def test_malformed_predict_requests_get_a_json_4xx(client, body, status, words):
    response = client.post("/predict", data=body, content_type="application/json")
    assert response.status_code == status
    assert response.json["error"] == "bad_request"
    assert words in response.json["message"]


def test_setup_requires_project_and_schema(client):
    assert "'project'" in client.post("/setup", json={"schema": TOPIC_CONFIG}).json["message"]
    assert "label_config" in client.post("/setup", json={"project": "1.1"}).json["message"]


def test_our_bugs_are_a_json_500(client, app, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(app.extensions["ls_backend"].predictor, "predict", broken)
    response = client.post("/predict", json={"tasks": [], "project": "1.1", "label_config": TOPIC_CONFIG})
    assert response.status_code == 500
    assert response.json["error"] == "internal_error" and "boom" in response.json["message"]


def test_versions_lists_every_version(client):
    client.post("/setup", json={"project": PROJECT, "schema": TOPIC_CONFIG})
    client.post("/setup", json={"project": "8.1", "schema": MULTI_CONFIG})
    assert sorted(client.get("/versions").json["versions"]) == ["p7-v0", "p8-v0"]
    assert client.get(f"/versions?project={PROJECT}").json == {"versions": ["p7-v0"]}
