"""Pre-labels from the first task on: the cold-start model through the Flask app."""

import time

import numpy as np
import pytest
from label_studio_sdk.label_interface import LabelInterface

from ls_backend.labeling import UnsupportedConfig, plan_for
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
        # only characters the tokenizer drops (zero-width space, controls, a BOM, a lone accent)
        {"id": 7, "data": {"text": "\u200b\u200b"}},
        {"id": 8, "data": {"text": "\x00\x01 \x7f \ufeff\u0301"}},
        {"id": 9, "data": {"text": "!!! 😀"}},  # punctuation and an emoji are read (as tokens and [UNK])
        {"id": 10, "data": {"text": "😀 🎉"}},  # unknown tokens alone: nothing the model can read
    ]
    results = predict(client, tasks)
    assert len(results) == len(tasks)
    assert results[0]["result"][0]["value"]["choices"] == ["Sports"]
    for entry in results[1:6] + results[7:9] + results[10:]:
        assert entry["result"] == [] and entry["score"] == 0.0 and entry["model_version"] == "p7-v0"
    assert len(results[6]["result"]) == 1 and len(results[9]["result"]) == 1


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


def test_a_label_that_comes_back_gets_the_row_learned_for_it_not_a_zero_shot_one(settings, encoder):
    """A request that still carried the older config (a second tab, a batch built before the save)
    re-shaped the model without a label, and the next request with the new config re-shaped it
    back with that label zero-shot: its learned row was lost for good."""
    from dataclasses import replace

    from ls_backend.predictor import Predictor

    grown = TOPIC_CONFIG.replace('<Choice value="World"/>', '<Choice value="World"/><Choice value="Health"/>')

    def worker() -> Predictor:  # a web worker that has served nothing yet (no check interval to wait out)
        return Predictor(settings, encoder=encoder)

    assert worker().setup(PROJECT, TOPIC_CONFIG) == "p7-v0"
    assert worker().setup(PROJECT, grown) == "p7-v1"
    registry = ModelRegistry(settings.model_dir)
    v1 = registry.load(PROJECT, "p7-v1")
    head = v1.heads["topic"]
    learned = np.random.default_rng(0).normal(size=head.weight.shape).astype(np.float32)  # as a job leaves it
    trained = replace(head, weight=learned, bias=np.arange(5, dtype=np.float32), trained=True, zero_shot_rows=[])
    v2 = registry.create_version(PROJECT, {"topic": trained}, {**v1.meta, "parent": "p7-v1", "kind": "fine-tune"})
    registry.promote(PROJECT, v2)
    assert worker().setup(PROJECT, TOPIC_CONFIG) == "p7-v3"  # the older config: Health dropped
    assert "Health" not in registry.load(PROJECT, "p7-v3").heads["topic"].labels
    assert worker().setup(PROJECT, grown) == "p7-v4"  # and back
    back = registry.load(PROJECT, "p7-v4").heads["topic"]
    health = trained.labels.index("Health")
    assert np.array_equal(back.weight[back.labels.index("Health")], learned[health])
    assert back.bias[back.labels.index("Health")] == health and "Health" not in back.zero_shot_rows
    for label in ("World", "Sports"):  # the rows that stayed are the learned ones too
        assert np.array_equal(back.weight[back.labels.index(label)], learned[trained.labels.index(label)])
    # a row learned for other weights means nothing to this encoder: a version that reads another
    # encoder ends the walk back
    other = registry.create_version(PROJECT, {"topic": registry.load(PROJECT, "p7-v3").heads["topic"]},
                                    {**registry.load(PROJECT, "p7-v3").meta, "parent": "p7-v3", "kind": "fine-tune",
                                     "encoder_stamp": "other-weights"})
    assert "Health" not in registry.learned_rows(PROJECT, registry.load(PROJECT, other)).get("topic", {})
    assert "Health" in registry.learned_rows(PROJECT, registry.load(PROJECT, "p7-v3"))["topic"]


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
        (b'{"tasks": ' + b"[" * 100_000, 400, "nested too deeply"),
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


# -- a current pointer naming a missing or unreadable version ---------------------------------------
def fresh_client(settings, encoder):
    """A web worker started now: nothing served yet in its process."""
    from ls_backend.api import create_app
    from ls_backend.predictor import Predictor

    return create_app(settings, Predictor(settings, encoder=encoder)).test_client()


def test_an_unreadable_current_version_serves_the_last_served_readable_one(client, settings, encoder):
    assert client.post("/setup", json={"project": PROJECT, "schema": TOPIC_CONFIG}).json["model_version"] == "p7-v0"
    registry = ModelRegistry(settings.model_dir)
    loaded = registry.load(PROJECT, "p7-v0")
    for _ in range(2):
        name = registry.create_version(PROJECT, loaded.heads, dict(loaded.meta, parent="p7-v0", kind="test"))
    registry.promote(PROJECT, name)  # p7-v1 was never promoted (as a version the gate refused)
    (registry.version_dir(PROJECT, name) / "meta.json").write_text("{not json")  # p7-v2: corrupt
    worker = fresh_client(settings, encoder)
    setup = worker.post("/setup", json={"project": PROJECT, "schema": TOPIC_CONFIG})
    assert setup.status_code == 200 and setup.json["model_version"] == "p7-v0"  # the last one that served
    assert predict(worker, [{"id": 1, "data": {"text": "The Lakers won"}}])[0]["model_version"] == "p7-v0"
    assert registry.current(PROJECT) == name  # serving around a broken pointer does not move it
    # with no served version readable, the newest readable one
    (registry.version_dir(PROJECT, "p7-v0") / "meta.json").write_text("{not json")
    worker = fresh_client(settings, encoder)
    assert worker.post("/setup", json={"project": PROJECT, "schema": TOPIC_CONFIG}).json["model_version"] == "p7-v1"


def test_a_missing_current_version_keeps_the_served_one_and_config_changes_work(client, settings, app):
    assert client.post("/setup", json={"project": PROJECT, "schema": TOPIC_CONFIG}).json["model_version"] == "p7-v0"
    registry = ModelRegistry(settings.model_dir)
    (registry.project_dir(PROJECT) / "current").write_text("p7-v9\n")  # a deleted version
    app.extensions["ls_backend"].predictor._serving[PROJECT].checked_at = -1e9
    assert predict(client, [{"id": 1, "data": {"text": "The Lakers won"}}])[0]["model_version"] == "p7-v0"
    grown = TOPIC_CONFIG.replace('<Choice value="World"/>', '<Choice value="World"/><Choice value="Health"/>')
    setup = client.post("/setup", json={"project": PROJECT, "schema": grown})
    assert setup.status_code == 200 and setup.json["model_version"] == "p7-v1"
    assert registry.meta(PROJECT, "p7-v1")["parent"] == "p7-v0"  # re-shaped from the version it served
    assert registry.current(PROJECT) == "p7-v1"


@pytest.mark.parametrize("pointer", ["removed", "emptied"])
def test_no_current_pointer_serves_the_last_served_version_and_never_writes_a_cold_start_over_it(
        client, settings, app, encoder, pointer):
    assert client.post("/setup", json={"project": PROJECT, "schema": TOPIC_CONFIG}).json["model_version"] == "p7-v0"
    registry = ModelRegistry(settings.model_dir)
    loaded = registry.load(PROJECT, "p7-v0")
    loaded.heads["topic"].weight = loaded.heads["topic"].weight[[1, 0, 2, 3]]  # a trained model, visibly: World <-> Sports
    trained = registry.create_version(PROJECT, loaded.heads, dict(loaded.meta, parent="p7-v0", kind="fine-tune"))
    registry.promote(PROJECT, trained)
    pointer_file = registry.project_dir(PROJECT) / "current"
    pointer_file.unlink() if pointer == "removed" else pointer_file.write_text("")
    task = [{"id": 1, "data": {"text": "The Yankees beat the Red Sox"}}]
    for worker in (fresh_client(settings, encoder), client):  # a worker started now, and one serving v0 before
        if worker is client:
            app.extensions["ls_backend"].predictor._serving[PROJECT].checked_at = -1e9
        result = predict(worker, task)[0]
        assert result["model_version"] in (trained, "p7-v0")
    fresh = predict(fresh_client(settings, encoder), task)[0]
    assert fresh["model_version"] == trained and fresh["result"][0]["value"]["choices"] == ["World"]
    assert [v.name for v in registry.versions(PROJECT)] == ["p7-v0", trained]  # no cold start written


def test_a_config_change_behind_an_unreadable_pointer_reshapes_what_served_last_not_this_workers_memory(
        client, settings, app):
    assert client.post("/setup", json={"project": PROJECT, "schema": TOPIC_CONFIG}).json["model_version"] == "p7-v0"
    registry = ModelRegistry(settings.model_dir)
    loaded = registry.load(PROJECT, "p7-v0")
    names = []
    for _ in range(3):
        names.append(registry.create_version(PROJECT, loaded.heads, dict(loaded.meta, parent="p7-v0", kind="test")))
        registry.promote(PROJECT, names[-1])
        if len(names) == 1:  # this worker serves p7-v1, and does not look again while v2 and v3 go live
            app.extensions["ls_backend"].predictor._serving[PROJECT].checked_at = -1e9
            assert predict(client, [{"id": 1, "data": {"text": "x"}}])[0]["model_version"] == "p7-v1"
    (registry.version_dir(PROJECT, names[-1]) / "meta.json").write_text("{torn")  # p7-v3: current, unreadable
    grown = TOPIC_CONFIG.replace('<Choice value="World"/>', '<Choice value="World"/><Choice value="Health"/>')
    version = client.post("/setup", json={"project": PROJECT, "schema": grown}).json["model_version"]
    assert registry.meta(PROJECT, version)["parent"] == "p7-v2"  # what served last, as every worker would pick


def setup_and_two_versions(client, settings) -> ModelRegistry:
    """The cold start p7-v0, then p7-v1 and p7-v2 promoted in turn (copies of it)."""
    assert client.post("/setup", json={"project": PROJECT, "schema": TOPIC_CONFIG}).json["model_version"] == "p7-v0"
    registry = ModelRegistry(settings.model_dir)
    loaded = registry.load(PROJECT, "p7-v0")
    for _ in range(2):
        registry.promote(PROJECT, registry.create_version(PROJECT, loaded.heads, dict(loaded.meta, parent="p7-v0",
                                                                                       kind="test")))
    return registry


def test_a_stand_in_is_never_the_version_an_operator_rolled_back_away_from(client, settings, encoder):
    """v1 then v2 served; the operator rolled back to v1; v1's meta.json then breaks: a fresh worker
    serves v0 (what served before v1), not v2, which the operator took out of service."""
    registry = setup_and_two_versions(client, settings)
    assert registry.rollback(PROJECT) == "p7-v1"
    (registry.version_dir(PROJECT, "p7-v1") / "meta.json").write_text("{torn")
    assert fresh_client(settings, encoder).post("/setup", json={"project": PROJECT, "schema": TOPIC_CONFIG}
                                                ).json["model_version"] == "p7-v0"
    assert registry.stand_ins(PROJECT) == ["p7-v1", "p7-v0", "p7-v2"]  # served, then rolled back away from


@pytest.mark.parametrize("content", ["null", "[]", "3"])
def test_a_meta_json_that_is_no_object_is_an_unreadable_version_not_a_500(client, settings, content):
    registry = setup_and_two_versions(client, settings)
    (registry.version_dir(PROJECT, "p7-v1") / "meta.json").write_text(content)
    listed = client.get(f"/projects/{PROJECT}/versions")
    assert listed.status_code == 200 and [v["version"] for v in listed.json["versions"]] == ["p7-v0", "p7-v2"]
    assert client.get(f"/projects/{PROJECT}/learning-curve").status_code == 200
    rolled = client.post(f"/projects/{PROJECT}/rollback", json={})  # passes over the unreadable p7-v1
    assert rolled.status_code == 200 and registry.current(PROJECT) == "p7-v0", rolled.json
    refused = client.post(f"/projects/{PROJECT}/rollback", json={"to": "p7-v1"})
    assert refused.status_code == 404 and "unreadable meta.json" in refused.json["message"]
    assert registry.current(PROJECT) == "p7-v0"
    (registry.version_dir(PROJECT, "p7-v2") / "meta.json").write_text("{torn")  # not JSON: named too
    refused = client.post(f"/projects/{PROJECT}/rollback", json={"to": "p7-v2"})
    assert refused.status_code == 404 and "p7-v2" in refused.json["message"] and "meta.json" in refused.json["message"]


def test_an_edited_hint_changes_what_its_label_is_matched_against(client):
    """A hint is the text a zero-shot label is embedded from: edited before any training, the new
    version's predictions follow it (the old head was kept, and nothing changed but the version)."""
    def config(hint):
        return ('<View><Text name="text" value="$text"/><Choices name="c" toName="text">'
                f'<Choice value="A" hint="{hint}"/><Choice value="B" hint="politics and elections"/></Choices></View>')

    task = [{"id": 1, "data": {"text": "The Lakers won the NBA title"}}]
    before = predict(client, task, config("cooking recipes"))[0]
    after = predict(client, task, config("basketball and sports"))[0]
    fresh = predict(client, task, config("basketball and sports"), project="8.1732665262")[0]
    assert before["result"][0]["value"]["choices"] == ["B"] and after["model_version"] != before["model_version"]
    assert after["result"][0]["value"]["choices"] == ["A"] and after["score"] == pytest.approx(fresh["score"])


CONDITIONAL_CONFIG = """<View><Text name="text" value="$text"/>
  <Choices name="topic" toName="text"><Choice value="Sports"/><Choice value="Politics"/></Choices>
  <View visibleWhen="choice-selected" whenTagName="topic" whenChoiceValue="Politics">
    <Choices name="party" toName="text"><Choice value="Democrats"/><Choice value="Republicans"/></Choices>
  </View>
  <Choices name="league" toName="text" visibleWhen="choice-unselected" whenTagName="topic" whenChoiceValue="Politics">
    <Choice value="NBA"/><Choice value="NFL"/></Choices>
</View>"""


def test_a_control_label_studio_would_hide_gets_no_result_and_no_say_in_the_score(client):
    """A question shown only when another choice is selected (on the control, or on a <View>
    around it): where the predicted choice hides it, it is not predicted, and its score no longer
    sets the task's (the annotator never sees it, and uncertainty sorting followed it)."""
    tasks = [{"id": 1, "data": {"text": "The Lakers won the NBA title"}},
             {"id": 2, "data": {"text": "The senate passed the election bill after a long debate"}}]
    sports, politics = predict(client, tasks, CONDITIONAL_CONFIG)
    shown = {r["from_name"]: r for r in sports["result"]}
    assert shown["topic"]["value"]["choices"] == ["Sports"] and set(shown) == {"topic", "league"}
    assert sports["score"] == min(r["score"] for r in sports["result"])
    shown = {r["from_name"]: r for r in politics["result"]}
    assert shown["topic"]["value"]["choices"] == ["Politics"] and set(shown) == {"topic", "party"}


CHAINED_CONFIG = """<View><Text name="text" value="$text"/>
  <Choices name="topic" toName="text"><Choice value="Sports"/><Choice value="Politics"/></Choices>
  <Choices name="party" toName="text" visibleWhen="choice-selected" whenTagName="topic" whenChoiceValue="Politics">
    <Choice value="Democrats"/><Choice value="Republicans"/></Choices>
  <Choices name="stance" toName="text" visibleWhen="MODE" whenTagName="party" whenChoiceValue="Democrats,Republicans">
    <Choice value="For"/><Choice value="Against"/></Choices>
</View>"""


@pytest.mark.parametrize("mode, stance_shown", [("choice-selected", False), ("choice-unselected", True)])
def test_a_condition_on_a_hidden_control_sees_nothing_selected_there(client, mode, stance_shown):
    """A chain of conditions: ``party`` shows only for Politics, ``stance`` depends on ``party``.
    For a sports text ``party`` is hidden and gets no result, so in Label Studio nothing is selected
    there: ``stance`` hides where it needs a party, and shows where it needs none."""
    task = [{"id": 1, "data": {"text": "The Lakers won the NBA title"}}]
    got = predict(client, task, CHAINED_CONFIG.replace("MODE", mode))[0]
    shown = {r["from_name"]: r for r in got["result"]}
    assert shown["topic"]["value"]["choices"] == ["Sports"]
    assert set(shown) == ({"topic", "stance"} if stance_shown else {"topic"})
    assert got["score"] == pytest.approx(min(r["score"] for r in got["result"]))


def test_a_prediction_uses_the_version_checked_against_its_label_config(client, monkeypatch):
    """A job's version (made under the old config) promoted between the check and the prediction
    must not answer for the new config."""
    from ls_backend import predictor as predictor_module

    assert client.post("/setup", json={"project": PROJECT, "schema": TOPIC_CONFIG}).status_code == 200
    real = predictor_module.Predictor._current_serving
    calls = []

    def later_a_stale_one(self, key):
        serving = real(self, key)
        calls.append(serving)
        if len(calls) > 1:  # what a second look would find: a version of another label config
            return predictor_module.Serving(version="p7-v99", heads=serving.heads, encoder=serving.encoder,
                                            signature="another config", checked_at=serving.checked_at)
        return serving

    monkeypatch.setattr(predictor_module.Predictor, "_current_serving", later_a_stale_one)
    result = predict(client, [{"id": 1, "data": {"text": "The Lakers won"}}])[0]
    assert result["model_version"] == "p7-v0"


def test_a_probability_row_that_is_not_finite_suggests_nothing_and_the_json_stays_valid(client, app, monkeypatch):
    import json

    from ls_backend.model import ClassifierHead

    real = ClassifierHead.probabilities

    def overflowed(self, embeddings):
        probs = real(self, embeddings)
        probs[0] = np.nan  # the first task's row, as an fp16 overflow would leave it
        return probs

    monkeypatch.setattr(ClassifierHead, "probabilities", overflowed)
    response = client.post("/predict", json={"tasks": [{"id": 1, "data": {"text": "The Lakers won"}},
                                                       {"id": 2, "data": {"text": "Stocks fell"}}],
                                             "project": PROJECT, "label_config": TOPIC_CONFIG})
    assert response.status_code == 200
    body = json.loads(response.get_data(as_text=True))  # Python's parser takes NaN: check it is not there
    assert "NaN" not in response.get_data(as_text=True)
    first, second = body["results"]
    assert first["result"] == [] and first["score"] == 0.0
    assert second["result"] and 0 <= second["score"] <= 1


def serve_a_head_that_tags_every_token(predictor, key: str, config: str | None = None) -> None:
    """Promote, for a project of ``config`` (NER_CONFIG by default) whose entity control is ``ner``, a
    token head that reads every token as the beginning of a PER, and make ``predictor`` serve it at
    its next request."""
    from ls_backend.ner import TokenHead

    from .support.events import NER_CONFIG

    predictor.setup(key, config or NER_CONFIG)
    registry = predictor.registry
    loaded = registry.load(key, registry.current(key))
    untrained = loaded.heads["ner"]
    bias = np.zeros_like(untrained.bias)
    bias[1] = 5.0
    heads = dict(loaded.heads)
    heads["ner"] = TokenHead(untrained.labels, np.zeros_like(untrained.weight), bias, trained=True, source="trained")
    registry.promote(key, registry.create_version(key, heads, dict(loaded.meta, parent=loaded.version, kind="test")))
    predictor._serving[key].checked_at = -1e9


def test_tag_probabilities_that_are_not_finite_suggest_no_regions_and_the_json_stays_valid(tmp_path, encoder, monkeypatch):
    import json

    from ls_backend import ner
    from ls_backend.api import create_app
    from ls_backend.predictor import Predictor
    from ls_backend.settings import Settings

    from .support.events import NER_CONFIG

    settings = Settings(model_dir=tmp_path / "models", max_length=128)
    predictor = Predictor(settings, encoder=encoder)
    key = "13.1"
    serve_a_head_that_tags_every_token(predictor, key)
    real = ner.run_windows

    def overflowed(*args, **kwargs):
        run = real(*args, **kwargs)
        run.probabilities[0][0][:] = np.nan  # the first text's rows, as an fp16 overflow would leave them
        return run

    monkeypatch.setattr(ner, "run_windows", overflowed)
    response = create_app(settings, predictor, preload=False).test_client().post("/predict", json={
        "project": key, "label_config": NER_CONFIG,
        "tasks": [{"id": 1, "data": {"text": "Angela Merkel spoke"}}, {"id": 2, "data": {"text": "Bob met Carl"}}]})
    assert response.status_code == 200
    assert "NaN" not in response.get_data(as_text=True)  # (Python's parser takes NaN: check the text)
    first, second = json.loads(response.get_data(as_text=True))["results"]
    assert first["result"] == [] and first["score"] == 0.0
    assert second["result"] and 0 <= second["score"] <= 1


def test_a_project_whose_versions_are_all_gone_starts_over_at_zero_shot(client, settings, encoder):
    import shutil

    client.post("/setup", json={"project": PROJECT, "schema": TOPIC_CONFIG})
    registry = ModelRegistry(settings.model_dir)
    shutil.rmtree(registry.versions_dir(PROJECT))
    worker = fresh_client(settings, encoder)
    results = worker.post("/predict", json={"tasks": [{"id": 1, "data": {"text": "The Lakers won"}}],
                                            "project": PROJECT, "label_config": TOPIC_CONFIG})
    assert results.status_code == 200, results.json
    version = results.json["results"][0]["model_version"]
    assert registry.current(PROJECT) == version and registry.meta(PROJECT, version)["kind"] == "cold-start"
    assert results.json["results"][0]["result"][0]["value"]["choices"] == ["Sports"]


# -- MAX_TEXT_CHARS ---------------------------------------------------------------------------------
def test_long_texts_are_read_up_to_max_text_chars(tmp_path, encoder):
    from ls_backend.predictor import Predictor
    from ls_backend.settings import Settings, SettingsError

    from .support.events import NER_CONFIG

    settings = Settings.from_env({"MODEL_DIR": str(tmp_path / "models"), "MAX_LENGTH": "128", "MAX_TEXT_CHARS": "1000"})
    assert settings.max_text_chars == 1000 and Settings.from_env({}).max_text_chars == 100_000
    with pytest.raises(SettingsError, match="MAX_TEXT_CHARS"):
        Settings.from_env({"MAX_TEXT_CHARS": "0"})
    predictor = Predictor(settings, encoder=encoder)
    key = "12.1"
    serve_a_head_that_tags_every_token(predictor, key)  # spans all along the text
    text = "Angela Merkel met Barack Obama in Berlin. " * 500  # 21,000 characters
    (entry,) = predictor.predict(key, NER_CONFIG, [{"id": 1, "data": {"text": text}}])
    spans = [item["value"] for item in entry["result"]]
    read = len(text.replace(" ", "")[:1000]) + text[:1300].count(" ")  # a bound: 1,000 visible characters and their spaces
    assert len(spans) > 100  # the first 1,000 characters besides whitespace are read...
    assert 1000 < max(value["end"] for value in spans) <= read  # ...and no more
    assert all(value["text"] == text[value["start"] : value["end"]] for value in spans)  # offsets into the whole text
    # whitespace does not count, as when a job embeds the text: a sentence after 5,000 newlines is read
    padded = "\n" * 5000 + "Angela Merkel met Barack Obama in Berlin."
    (entry,) = predictor.predict(key, NER_CONFIG, [{"id": 2, "data": {"text": padded}}])
    assert entry["result"] and all(item["value"]["start"] >= 5000 for item in entry["result"]), entry


def test_predict_answers_its_own_time_in_a_server_timing_header(client):
    body = {"tasks": [{"id": 1, "data": {"text": "Stocks fell as oil prices rose"}}], "project": PROJECT,
            "label_config": TOPIC_CONFIG}
    started = time.perf_counter()
    response = client.post("/predict", json=body)
    elapsed_ms = (time.perf_counter() - started) * 1000
    name, _, duration = response.headers["Server-Timing"].partition(";dur=")
    assert response.status_code == 200 and name == "predict"
    assert 0 < float(duration) <= elapsed_ms


def test_a_body_over_max_request_mb_gets_413_with_the_setting_to_change(settings, encoder):
    import json as json_module

    worker = fresh_client(settings.with_overrides(max_request_mb=1), encoder)
    tasks = [{"id": i, "data": {"text": "x" * 1000}} for i in range(1200)]  # about 1.2 MiB of JSON
    body = json_module.dumps({"tasks": tasks, "project": PROJECT, "label_config": TOPIC_CONFIG})
    answer = worker.post("/predict", data=body, content_type="application/json")
    assert answer.status_code == 413 and "MAX_REQUEST_MB" in answer.json["message"], answer.json
    assert "fewer tasks" in answer.json["message"]
    event = worker.post("/webhook", data=json_module.dumps({"action": "ANNOTATION_CREATED", "pad": "x" * 1_200_000}),
                        content_type="application/json")
    assert event.status_code == 413 and "MAX_REQUEST_MB" in event.json["message"]
    assert "tasks" not in event.json["message"]  # a webhook carries one event, not a batch to split
    small = worker.post("/predict", json={"tasks": tasks[:10], "project": PROJECT, "label_config": TOPIC_CONFIG})
    assert small.status_code == 200 and len(small.json["results"]) == 10


# -- PREDICT_TIME_BUDGET -----------------------------------------------------------------------------
HEADLINES = ["The Lakers won the final", "Stocks fell on Wall Street", "A new chip doubles battery life",
             "Peace talks resume in Geneva", "The striker signed a new contract", "Oil prices climb again",
             "Scientists map a distant galaxy", "Elections are set for March", "The index closed higher"]


def test_a_predict_call_answers_within_its_budget_and_leaves_the_rest_for_the_next_call(settings, encoder):
    """A "Retrieve predictions" batch that cannot finish within Label Studio's 100 s stores
    nothing at all; within the budget, the tasks reached get their predictions and the others an
    entry without ``result``, which Label Studio skips (and asks for again next time)."""
    tasks = [{"id": i, "data": {"text": text}} for i, text in enumerate(HEADLINES)]
    whole = predict(fresh_client(settings.with_overrides(batch_size=2, predict_time_budget=0), encoder), tasks)
    assert all(entry["result"] for entry in whole)
    roomy = predict(fresh_client(settings.with_overrides(batch_size=2, predict_time_budget=600), encoder), tasks)
    for ours, theirs in zip(roomy, whole):  # predicted in runs: the same suggestions
        assert ours["result"][0]["value"] == theirs["result"][0]["value"]
        assert ours["score"] == pytest.approx(theirs["score"], abs=1e-4)
    # the first run (FIRST_RUN_BATCHES batches of one) always runs
    tight = predict(fresh_client(settings.with_overrides(batch_size=1, predict_time_budget=1e-6), encoder), tasks)
    assert len(tight) == len(tasks) and [bool(entry.get("result")) for entry in tight] == [True] * 8 + [False]
    for entry in tight[8:]:
        assert "result" not in entry and entry["model_version"] == whole[0]["model_version"], entry
        assert "PREDICT_TIME_BUDGET" in entry["error"] and "8 of 9 tasks" in entry["error"], entry


def test_the_runs_of_a_budgeted_call_are_sized_by_its_pace(settings, encoder, monkeypatch):
    """One second per task on a clock of the test's: a 20 s budget ends its runs by the deadline,
    each run taking at most half of the time left."""
    from ls_backend import predictor as predictor_module
    from ls_backend.predictor import Predictor

    clock = [0.0]
    monkeypatch.setattr(predictor_module.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(predictor_module, "FIRST_RUN_BATCHES", 1)
    served = Predictor(settings.with_overrides(batch_size=2), encoder=encoder)
    runs = []
    real = served.predict_with

    def paced(serving, plan, tasks, project_key="", keep=None):
        runs.append((len(tasks), clock[0]))
        clock[0] += len(tasks)
        return real(serving, plan, tasks, project_key, keep)

    monkeypatch.setattr(served, "predict_with", paced)
    tasks = [{"id": i, "data": {"text": HEADLINES[i % len(HEADLINES)]}} for i in range(100)]
    results = served.predict(PROJECT, TOPIC_CONFIG, tasks, deadline=20.0)
    assert [size for size, _ in runs] == [2, 9, 4, 2, 1, 1]
    for size, at in runs[1:]:
        assert size <= (20.0 - at) / 2  # half of what is left, at one task a second
    assert clock[0] <= 20.0 and sum(size for size, _ in runs) == 19
    assert all(entry.get("result") for entry in results[:19]) and not any("result" in e for e in results[19:])


def test_a_worker_serving_a_version_whose_folder_was_removed_moves_to_the_stand_in(settings, encoder):
    """The current version's folder removed by hand, the pointer left naming it: a worker that had
    it loaded kept answering with it, while a worker started since served the stand-in, so Label
    Studio saw two model_versions for one project."""
    from dataclasses import replace
    import shutil

    settings = replace(settings, version_check_interval=0.0)
    worker = fresh_client(settings, encoder)
    assert worker.post("/setup", json={"project": PROJECT, "schema": TOPIC_CONFIG}).json["model_version"] == "p7-v0"
    registry = ModelRegistry(settings.model_dir)
    loaded = registry.load(PROJECT, "p7-v0")
    tuned = registry.create_version(PROJECT, loaded.heads, dict(loaded.meta, parent="p7-v0", kind="fine-tune"))
    registry.promote(PROJECT, tuned)
    task = [{"id": 1, "data": {"text": "The Lakers won"}}]
    assert predict(worker, task)[0]["model_version"] == tuned
    shutil.rmtree(registry.version_dir(PROJECT, tuned))
    started_since = fresh_client(settings, encoder)
    for client in (worker, started_since):
        assert predict(client, task)[0]["model_version"] == "p7-v0"
        assert client.post("/setup", json={"project": PROJECT, "schema": TOPIC_CONFIG}).json["model_version"] == "p7-v0"
    assert registry.served_version(PROJECT) == "p7-v0"


def test_a_current_version_whose_encoder_will_not_load_does_not_fail_a_fresh_workers_requests(client, settings, encoder):
    """An incomplete encoder/ folder (a copy cut short): a worker started now serves the version
    that served before it, and answers every request; it tries the broken one again later, not on
    every check."""
    assert client.post("/setup", json={"project": PROJECT, "schema": TOPIC_CONFIG}).json["model_version"] == "p7-v0"
    registry = ModelRegistry(settings.model_dir)
    loaded = registry.load(PROJECT, "p7-v0")

    def broken_encoder(folder):  # every file there, but the weights are no safetensors file
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        (folder / "tokenizer_config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"cut short")

    tuned = registry.create_version(PROJECT, loaded.heads, dict(loaded.meta, parent="p7-v0", kind="fine-tune"),
                                    write_encoder=broken_encoder)
    registry.promote(PROJECT, tuned)
    worker = fresh_client(settings, encoder)
    result = predict(worker, [{"id": 1, "data": {"text": "The Lakers won"}}])[0]
    assert result["model_version"] == "p7-v0" and result["result"]
    assert worker.post("/setup", json={"project": PROJECT, "schema": TOPIC_CONFIG}).json["model_version"] == "p7-v0"
    predictor = worker.application.extensions["ls_backend"].predictor
    assert (PROJECT, tuned) in predictor._broken


# -- label configs as Label Studio reads them -----------------------------------------------------
def test_a_text_in_a_nested_data_field_is_read_as_label_studio_reads_it(client):
    """``value="$meta.text"`` names ``data["meta"]["text"]`` in Label Studio (lodash's get); it was
    looked up as a key "meta.text", and every task got an empty prediction."""
    config = TOPIC_CONFIG.replace('value="$text"', 'value="$meta.text"')
    tasks = [{"id": 1, "data": {"meta": {"text": "The Lakers won the NBA title"}}},
             {"id": 2, "data": {"meta.text": "The senate passed the election bill"}},  # the key itself comes first
             {"id": 3, "data": {"meta": {"title": "no text here"}}}]
    nested, literal, missing = predict(client, tasks, config)
    assert nested["result"][0]["value"]["choices"] == ["Sports"] and nested["score"] > 0
    assert literal["result"] and literal["score"] > 0
    assert missing["result"] == [] and missing["score"] == 0.0


def test_training_reads_a_nested_data_field_too(tmp_path):
    from ls_backend.store import CorrectionStore

    from .support.events import annotation_event, choices, project

    config = TOPIC_CONFIG.replace('value="$text"', 'value="$meta.text"')
    store = CorrectionStore(f"sqlite:///{tmp_path / 'store.sqlite'}")
    try:
        event = annotation_event(1, 10, choices("Sports"), proj=project(7, config=config))
        event["task"]["data"] = {"meta": {"text": "The Lakers won the NBA title"}}
        store.record_event(event)
        key = store.projects()[0].key
        plan = plan_for(config)
        (examples,) = [store.training_examples(key, c) for c in plan.controls]
        assert [(e.text, e.labels) for e in examples] == [("The Lakers won the NBA title", ("Sports",))]
    finally:
        store.close()


def test_nested_choices_label_studio_never_shows_are_not_labels():
    """Without allowNested a <Choice> inside another is neither shown nor selectable in Label Studio;
    they were labels of their own, and a prediction of one showed nothing chosen."""
    config = ('<View><Text name="t" value="$text"/><Choices name="c" toName="t">'
              '<Choice value="Sports"><Choice value="Football"/><Choice value="Tennis"/></Choice>'
              '<Choice value="Politics"/></Choices></View>')
    assert plan_for(config).controls[0].values == ("Sports", "Politics")
    nested = config.replace('toName="t">', 'toName="t" allowNested="true">')
    with pytest.raises(UnsupportedConfig, match="allowNested"):
        plan_for(nested)


def test_visibility_as_label_studio_applies_it_to_entities_and_to_the_older_form(client, settings, encoder):
    """Label Studio reads no visibleWhen on <Labels> (its regions show on the <Text>), and shows a
    control with whenChoiceValue alone while any control has that value chosen."""
    from ls_backend.predictor import Predictor

    from .support.events import NER_AND_TOPIC_CONFIG

    task = [{"id": 1, "data": {"text": "Stocks fell on Wall Street as oil prices rose"}}]
    older = TOPIC_CONFIG.replace("</View>", '<Choices name="sport" toName="text" whenChoiceValue="Sports">'
                                            '<Choice value="Football"/><Choice value="Tennis"/></Choices></View>')
    got = predict(client, task, older)[0]
    assert {r["from_name"] for r in got["result"]} == {"topic"}, got  # not Sports: the sport question stays hidden
    sports = predict(client, [{"id": 2, "data": {"text": "The Lakers won the NBA title"}}], older)[0]
    assert {r["from_name"] for r in sports["result"]} == {"topic", "sport"}
    # a value no predicted control holds cannot be judged: the control shows
    unknown = older.replace('whenChoiceValue="Sports"', 'whenChoiceValue="Cricket"')
    assert {r["from_name"] for r in predict(client, task, unknown)[0]["result"]} == {"topic", "sport"}
    # entities under a condition on their own <Labels> (a World text, the condition asks for Sports):
    # shown all the same; under one on a <View> around their <Text>, hidden
    predictor = Predictor(settings, encoder=encoder)
    serve_a_head_that_tags_every_token(predictor, "14.1", NER_AND_TOPIC_CONFIG)
    (plain,) = predictor.predict("14.1", NER_AND_TOPIC_CONFIG, task)
    topic = next(r["value"]["choices"][0] for r in plain["result"] if r["from_name"] == "topic")
    other = "World" if topic == "Sports" else "Sports"  # a condition the predicted topic does not meet
    condition = f'visibleWhen="choice-selected" whenTagName="topic" whenChoiceValue="{other}"'
    on_labels = NER_AND_TOPIC_CONFIG.replace('<Labels name="ner"', f'<Labels {condition} name="ner"')
    serve_a_head_that_tags_every_token(predictor, "15.1", on_labels)
    (entry,) = predictor.predict("15.1", on_labels, task)
    assert "ner" in {r["from_name"] for r in entry["result"]}, entry["result"]
    around_text = NER_AND_TOPIC_CONFIG.replace('<Text name="text" value="$text"/>',
                                               f'<View {condition}><Text name="text" value="$text"/></View>')
    assert plan_for(around_text).control("ner").visible_when == (("choice-selected", "topic", (other,)),)
    assert plan_for(around_text).control("topic").visible_when == ()
