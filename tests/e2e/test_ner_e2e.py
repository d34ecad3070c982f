"""Named entities end to end: a real Label Studio 1.23.2 stores and accepts our span predictions,
empty before any NER training, and the spans of a version trained on its annotations after that."""

from __future__ import annotations

import time
from collections import Counter

import pytest
import requests

from ls_backend.finetune import in_eval_slice
from tests.support.backend import BackendServer
from tests.support.conll import as_text, read_sentences
from tests.support.data import data_file
from tests.support.events import project_key

pytestmark = pytest.mark.e2e

NER_CONFIG = (
    '<View><Text name="text" value="$text"/>'
    '<Labels name="ner" toName="text">'
    '<Label value="PER"/><Label value="ORG"/><Label value="LOC"/><Label value="MISC"/>'
    "</Labels></View>"
)
TASKS = 48
LABELED = 40



def check_predictions(ls, project_id: int, task_ids: list[int], texts: dict[int, str], version: str | None = None) -> list[dict]:
    """Label Studio's stored predictions (of ``version`` when given): one per task, each valid."""
    from label_studio_sdk.label_interface import LabelInterface

    interface = LabelInterface(NER_CONFIG)
    predictions = [p for p in ls.predictions(project_id) if version is None or p["model_version"] == version]
    per_task = Counter(p["task"] for p in predictions)
    assert set(per_task) == set(task_ids) and set(per_task.values()) == {1}, (
        f"expected one prediction per task, got {dict(per_task)}\n{ls.log_tail()}"
    )
    for prediction in predictions:
        text = texts[prediction["task"]]
        for item in prediction["result"]:
            assert (item["from_name"], item["to_name"], item["type"]) == ("ner", "text", "labels"), item
            value = item["value"]
            assert value["text"] == text[value["start"] : value["end"]], (text, item)
            assert value["labels"][0] in ("PER", "ORG", "LOC", "MISC") and 0 <= item["score"] <= 1, item
        errors = interface.validate_prediction({"result": prediction["result"], "score": prediction.get("score")},
                                               return_errors=True)
        assert errors == [], f"LabelInterface rejects the prediction for task {prediction['task']}: {errors}"
    return predictions


def test_ner_predictions_are_stored_empty_before_training_and_with_spans_after(label_studio, tmp_path):
    rows = [as_text(s, natural=True) for s in read_sentences(data_file("conll2003", "eng.train"), limit=TASKS)]
    ls = label_studio
    project = ls.create_project("NER (e2e)", NER_CONFIG)
    task_ids = ls.import_tasks(project["id"], [{"text": text} for text, _, _ in rows])
    texts = {task_id: text for task_id, (text, _, _) in zip(task_ids, rows)}
    key = project_key(project)
    # a short schedule (about 25 steps of 16 windows): a minute of CPU
    env = {"WEB_WORKERS": "1", "TORCH_THREADS": "1", "TRAIN_EVERY": "0", "TRAIN_MAX_LENGTH": "64", "TRAIN_EPOCHS": "10",
           "TRAIN_MIN_STEPS": "10", "LEARNING_RATE": "2e-4", "EVAL_MIN": "5", "SYNC_CHECK_INTERVAL": "0"}
    with BackendServer(tmp_path / "models", env=env) as backend:
        ml_id = ls.connect_ml_backend(project["id"], backend.url, title="ls-backend ner e2e")
        assert ls.ml_backend(ml_id)["state"] == "CO", ls.log_tail()

        # before any NER training: one stored prediction per task, honest and empty
        ls.retrieve_predictions(project["id"])
        cold = check_predictions(ls, project["id"], task_ids, texts)
        assert all(p["result"] == [] for p in cold), cold[:3]
        cold_version = cold[0]["model_version"]

        # annotations through Label Studio (its webhook stores them), then its "Start Training"
        for task_id, (text, spans, _) in list(zip(task_ids, rows))[:LABELED]:
            result = [{"from_name": "ner", "to_name": "text", "type": "labels",
                       "value": {"start": a, "end": b, "text": text[a:b], "labels": [label]}} for a, b, label in spans]
            ls.create_annotation(task_id, result)
        ls.train(ml_id)
        deadline = time.monotonic() + 900
        while True:
            jobs = requests.get(f"{backend.url}/jobs", params={"project": key}, timeout=10).json()["jobs"]
            if jobs and all(job["state"] in ("finished", "failed") for job in jobs):
                break
            assert time.monotonic() < deadline, f"training did not finish: {jobs}\n{backend.log()}"
            time.sleep(2)
        assert all(job["state"] == "finished" for job in jobs), f"{jobs}\n{backend.log()}"
        versions = requests.get(f"{backend.url}/projects/{key}/versions", timeout=10).json()
        trained = versions["current"]
        assert trained != cold_version, versions
        row = next(v for v in versions["versions"] if v["version"] == trained)
        # a training task repeating a text of the slice (CoNLL repeats its datelines) is left out
        labeled = list(zip(task_ids, rows))[:LABELED]
        judged = {text for task_id, (text, _, _) in labeled if in_eval_slice(task_id, 0.2)}
        twins = sum(text in judged for task_id, (text, _, _) in labeled if not in_eval_slice(task_id, 0.2))
        assert row["data"]["ner"]["train"] + row["data"]["ner"]["eval"] == LABELED - twins, row

        # the new version's spans reach Label Studio
        time.sleep(1.5)  # past VERSION_CHECK_INTERVAL
        ls.retrieve_predictions(project["id"])
        assert ls.ml_backend(ml_id)["model_version"] == trained
        fresh = check_predictions(ls, project["id"], task_ids, texts, version=trained)
        found = [item for p in fresh for item in p["result"]]
        assert len(found) >= 10, (found, backend.log())
