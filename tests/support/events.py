"""Webhook payloads shaped as Label Studio 1.23 sends them (see ../shared/label-studio.md)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

TOPIC_CONFIG = """<View>
  <Text name="text" value="$text"/>
  <Choices name="topic" toName="text" choice="single">
    <Choice value="World"/><Choice value="Sports"/><Choice value="Business"/><Choice value="Sci/Tech"/>
  </Choices>
</View>"""

SENTIMENT_CONFIG = """<View>
  <Text name="text" value="$text"/>
  <Choices name="sentiment" toName="text" choice="single">
    <Choice value="Positive"/><Choice value="Negative"/>
  </Choices>
</View>"""

NER_CONFIG = """<View>
  <Text name="text" value="$text"/>
  <Labels name="ner" toName="text">
    <Label value="PER"/><Label value="ORG"/><Label value="LOC"/><Label value="MISC"/>
  </Labels>
</View>"""

NER_AND_TOPIC_CONFIG = """<View>
  <Text name="text" value="$text"/>
  <Choices name="topic" toName="text" choice="single">
    <Choice value="World"/><Choice value="Sports"/>
  </Choices>
  <Labels name="ner" toName="text"><Label value="PER"/><Label value="ORG"/></Labels>
</View>"""

CREATED_AT = "2026-11-27T00:54:22.448107Z"
BASE_TIME = datetime(2026, 11, 27, 1, 0, tzinfo=timezone.utc)


def stamp(seconds: float) -> str:
    return (BASE_TIME + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


def key_of(project_id: int, created_at: str = CREATED_AT) -> str:
    moment = datetime.fromisoformat(created_at.replace("Z", "+00:00"))
    return f"{project_id}.{int(moment.timestamp())}"


def project_key(project: dict) -> str:
    """What Label Studio sends to /setup and /predict for a project (its API payload):
    "<id>.<created_at as an int timestamp>"."""
    return key_of(project["id"], project["created_at"])


def project(project_id: int = 3, config: str = TOPIC_CONFIG, created_at: str = CREATED_AT, updated: float = 0,
            total: int | None = None, title: str = "topics") -> dict:
    body = {
        "id": project_id,
        "title": title,
        "created_at": created_at,
        "updated_at": stamp(updated),
        "label_config": config,
    }
    if total is not None:
        body["total_annotations_number"] = total
    return body


def choices(*values: str, control: str = "topic") -> list[dict]:
    return [{"from_name": control, "to_name": "text", "type": "choices", "value": {"choices": list(values)}}]


def span(start: int, end: int, text: str, label: str) -> dict:
    return {"from_name": "ner", "to_name": "text", "type": "labels",
            "value": {"start": start, "end": end, "text": text, "labels": [label]}}


def annotation_event(annotation_id: int, task_id: int, result: list, *, action: str = "ANNOTATION_CREATED",
                     updated: float = 0, annotator: int = 1, cancelled: bool = False, ground_truth: bool = False,
                     text: str | None = None, proj: dict | None = None) -> dict:
    proj = proj or project()
    return {
        "action": action,
        "annotation": {
            "id": annotation_id,
            "task": task_id,
            "project": proj["id"],
            "result": result,
            "completed_by": annotator,
            "was_cancelled": cancelled,
            "ground_truth": ground_truth,
            "created_at": stamp(0),
            "updated_at": stamp(updated),
        },
        "task": {"id": task_id, "project": proj["id"], "data": {"text": text if text is not None else f"text of {task_id}"}},
        "project": proj,
    }


def deleted_event(*annotation_ids: int, proj: dict | None = None) -> dict:
    return {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": i} for i in annotation_ids],
            "project": proj or project()}
