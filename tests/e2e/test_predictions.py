"""Label Studio asks the backend for predictions and stores valid, useful ones.

The whole path is real: Label Studio 1.23.2 calls /health and /setup when the backend is
connected, sends every task in one /predict for the Data Manager's "Retrieve predictions", and
keeps what comes back only if the answer has one entry per task.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from pathlib import Path

import pytest
import requests

from tests.support.events import project_key

pytestmark = pytest.mark.e2e

LABELS = ["World", "Sports", "Business", "Sci/Tech"]
TOPIC_CONFIG = (
    '<View><Text name="text" value="$text"/>'
    '<Choices name="topic" toName="text" choice="single">'
    '<Choice value="World"/><Choice value="Sports"/><Choice value="Business"/><Choice value="Sci/Tech"/>'
    "</Choices></View>"
)
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
AGNEWS_TEST = SHARED_DATA / "agnews" / "test.tsv"
PER_LABEL = 5  # 20 tasks in all


def agnews_sample(per_label: int = PER_LABEL) -> list[tuple[str, str]]:
    """The first ``per_label`` rows of each topic, in file order.

    The file's first 20 rows are 19 Sci/Tech and 1 Business, so the plain head would let a model
    that always answers Sci/Tech look excellent; a balanced sample makes "above chance" mean
    something.
    """
    if not AGNEWS_TEST.is_file():
        reason = f"AG News test data not found at {AGNEWS_TEST} (it lives in ../shared/data beside the repository)"
        if os.environ.get("CI", "").strip().lower() == "true":
            pytest.fail(reason + " (CI=true: the data must be present)", pytrace=False)
        pytest.skip(reason)
    taken: Counter = Counter()
    rows = []
    with open(AGNEWS_TEST, newline="", encoding="utf-8") as handle:
        for text, label in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
            assert label in LABELS, f"unexpected AG News label {label!r} in {AGNEWS_TEST}"
            if taken[label] < per_label:
                taken[label] += 1
                rows.append((text, label))
            if len(rows) == per_label * len(LABELS):
                return rows
    pytest.fail(f"{AGNEWS_TEST} has fewer than {per_label} rows of each topic")


def test_retrieve_predictions_stores_one_valid_prediction_per_task(label_studio, backend):
    from label_studio_sdk.label_interface import LabelInterface

    rows = agnews_sample()
    ls = label_studio
    project = ls.create_project("AG News topics (e2e)", TOPIC_CONFIG)
    task_ids = ls.import_tasks(project["id"], [{"text": text} for text, _ in rows])
    gold = dict(zip(task_ids, (label for _, label in rows)))

    ml_id = ls.connect_ml_backend(project["id"], backend.url, title="ls-backend e2e")
    ml = ls.ml_backend(ml_id)
    assert ml["state"] == "CO", f"Label Studio does not see the backend as connected: {ml}\n{ls.log_tail()}"

    ls.retrieve_predictions(project["id"])
    predictions = ls.predictions(project["id"])
    context = f"\nLabel Studio log ({ls.log_path}):\n{ls.log_tail()}"
    if hasattr(backend, "log"):
        context += f"\nbackend log:\n{backend.log()}"

    per_task = Counter(p["task"] for p in predictions)
    assert set(per_task) == set(task_ids) and set(per_task.values()) == {1}, (
        f"expected exactly one prediction for each of the {len(task_ids)} tasks, got {dict(per_task)}" + context
    )

    # The version Label Studio recorded from /setup, and what /setup answers for this project now.
    setup = requests.post(
        backend.url + "/setup",
        json={"project": project_key(project), "schema": TOPIC_CONFIG, "hostname": ls.url, "access_token": ls.token},
        auth=getattr(backend, "auth", None),
        timeout=30,
    )
    assert setup.ok, f"/setup answered {setup.status_code}: {setup.text}"
    version = setup.json()["model_version"]
    assert isinstance(version, str) and version, f"/setup gave model_version {version!r}"
    assert ls.ml_backend(ml_id)["model_version"] == version

    interface = LabelInterface(TOPIC_CONFIG)
    correct = 0
    for prediction in predictions:
        assert prediction["model_version"] == version, prediction
        result = prediction["result"]
        assert len(result) == 1, prediction
        (item,) = result
        assert item["from_name"] == "topic" and item["to_name"] == "text" and item["type"] == "choices", item
        choices = item["value"]["choices"]
        assert isinstance(choices, list) and len(choices) == 1 and choices[0] in LABELS, item
        assert 0.0 <= float(item["score"]) <= 1.0, item
        assert prediction.get("score") is not None and 0.0 <= float(prediction["score"]) <= 1.0, prediction
        errors = interface.validate_prediction({"result": result, "score": prediction.get("score")}, return_errors=True)
        assert errors == [], f"LabelInterface rejects the prediction for task {prediction['task']}: {errors}"
        correct += choices[0] == gold[prediction["task"]]

    accuracy = correct / len(predictions)
    assert accuracy > 0.4, f"accuracy {accuracy:.2f} over {len(predictions)} AG News texts is not above chance"


def test_retrieve_predictions_over_budget_stores_what_was_reached_and_asks_again_for_the_rest(
    label_studio, tmp_path_factory
):
    """A backend that cannot predict a whole "Retrieve predictions" batch within its budget
    answers for the tasks it reached; Label Studio keeps those, skips the rest without failing the
    batch, and asks for the rest at the next press, until every task has its prediction."""
    from tests.support.backend import BackendServer

    server = BackendServer(tmp_path_factory.mktemp("budget") / "models",
                           env={"PREDICT_TIME_BUDGET": "0.000001", "BATCH_SIZE": "1", "WEB_WORKERS": "1"})
    server.start()
    try:
        ls = label_studio
        project = ls.create_project("Retrieve predictions within a budget (e2e)", TOPIC_CONFIG)
        task_ids = ls.import_tasks(project["id"], [{"text": text} for text, _ in agnews_sample()])  # 20
        ml_id = ls.connect_ml_backend(project["id"], server.url, title="ls-backend budget e2e")
        assert ls.ml_backend(ml_id)["state"] == "CO", ls.log_tail()
        stored = []
        for _press in range(3):
            ls.retrieve_predictions(project["id"])
            stored.append(Counter(p["task"] for p in ls.predictions(project["id"])))
        context = f"\nLabel Studio log:\n{ls.log_tail()}\nbackend log:\n{server.log()}"
        # eight tasks a press (the first run, 8 batches of BATCH_SIZE tasks, always runs), each predicted once
        assert [len(found) for found in stored] == [8, 16, 20], [dict(found) for found in stored] + [context]
        assert set(stored[-1]) == set(task_ids) and set(stored[-1].values()) == {1}, context
        assert all(p["result"] for p in ls.predictions(project["id"])), context
    finally:
        server.stop()
