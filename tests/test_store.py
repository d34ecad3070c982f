"""The corrections store, against SQLite and the real PostgreSQL."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from ls_backend import store as store_module
from ls_backend.labeling import plan_for
from ls_backend.store import BadEvent, CorrectionStore, StoreError, UnknownProject, database_url
from tests.support.events import (
    NER_AND_TOPIC_CONFIG,
    TOPIC_CONFIG,
    annotation_event,
    choices,
    deleted_event,
    key_of,
    project,
    span,
    stamp,
)
from tests.support.stores import BACKENDS, store_url

KEY = key_of(3)
TOPIC = plan_for(TOPIC_CONFIG).control("topic")


@pytest.fixture(params=BACKENDS)
def url(request, tmp_path):
    with store_url(request.param, tmp_path) as value:
        yield value


@pytest.fixture
def store(url):
    opened = CorrectionStore(url)
    yield opened
    opened.close()


def labels_of(store, key=KEY, control=TOPIC):
    return {e.task_id: e.labels for e in store.training_examples(key, control)}


# -- upserts, replays, deletes ------------------------------------------------------------
def test_create_replay_and_update_count_changes_once(store):
    first = store.record_event(annotation_event(1, 10, choices("World")))
    assert (first.action, first.project_key, first.changed, first.trigger) == ("ANNOTATION_CREATED", KEY, 1, False)
    assert store.record_event(annotation_event(1, 10, choices("World"))).changed == 0
    updated = store.record_event(annotation_event(1, 10, choices("Sports"), action="ANNOTATION_UPDATED", updated=60))
    assert updated.changed == 1
    assert labels_of(store) == {10: ("Sports",)}
    assert store.stored_annotations(KEY) == 1


def test_the_latest_updated_at_wins_whatever_the_arrival_order(store):
    store.record_event(annotation_event(1, 10, choices("Sports"), action="ANNOTATION_UPDATED", updated=120))
    late = store.record_event(annotation_event(1, 10, choices("World"), updated=0))
    assert late.changed == 0
    assert labels_of(store) == {10: ("Sports",)}


def test_a_delete_leaves_a_tombstone_that_a_late_replay_cannot_cross(store):
    store.record_event(annotation_event(1, 10, choices("World")))
    store.record_event(annotation_event(2, 11, choices("Sports")))
    outcome = store.record_event(deleted_event(1, 99))  # 99: never seen, still buried
    assert (outcome.action, outcome.changed, outcome.stored_annotations) == ("ANNOTATIONS_DELETED", 1, 1)
    assert store.record_event(annotation_event(1, 10, choices("World"), action="ANNOTATION_UPDATED", updated=500)).changed == 0
    assert store.record_event(annotation_event(99, 12, choices("World"))).changed == 0
    assert labels_of(store) == {11: ("Sports",)}
    assert store.project_summary(KEY).deleted == 2
    assert store.record_event(deleted_event(1)).changed == 0  # deleting twice is a no-op


def test_deleted_tasks_take_their_annotations_with_them(store):
    store.record_event(annotation_event(1, 10, choices("World")))
    store.record_event(annotation_event(2, 10, choices("World"), annotator=2))
    store.record_event(annotation_event(3, 11, choices("Sports")))
    outcome = store.record_event({"action": "TASKS_DELETED", "tasks": [{"id": 10}], "project": project()})
    assert outcome.changed == 2
    assert labels_of(store) == {11: ("Sports",)}


def test_a_late_event_for_an_annotation_of_a_deleted_task_is_not_stored(store):
    """Webhooks can arrive out of order (a retrying proxy, a queue): a task deleted in Label Studio
    stays deleted, whatever comes for it afterwards, from a webhook or a sync."""
    from ls_backend.store import AnnotationRecord, ProjectInfo

    store.record_event(annotation_event(1, 10, choices("World")))
    store.record_event({"action": "TASKS_DELETED", "tasks": [{"id": 10}, {"id": 12}], "project": project()})
    late = store.record_event(annotation_event(2, 12, choices("Sports"), updated=999))  # made before the deletion
    assert late.changed == 0 and late.stored_annotations == 0
    assert store.deleted_task_ids(KEY) == {10, 12} and labels_of(store) == {}
    event = annotation_event(3, 10, choices("World"))
    counts = store.ingest(ProjectInfo.from_payload(project()),
                          [AnnotationRecord.from_payload(event["annotation"], event["task"], 3)])
    assert (counts.inserted, counts.tombstoned) == (0, 1) and store.annotation_ids(KEY) == set()
    # the same deletion again changes nothing; other tasks are untouched
    again = store.record_event({"action": "TASKS_DELETED", "tasks": [{"id": 10}], "project": project()})
    assert again.changed == 0 and store.record_event(annotation_event(4, 11, choices("World"))).changed == 1


def test_a_new_task_under_the_id_of_a_deleted_one_keeps_its_labels(store):
    """Label Studio on SQLite (its default) gives the next task the id of the last one deleted (seen
    on 1.23.2: task 13 deleted, the next import was task 13 again). Every label on that new task was
    taken for a late event of the deleted one and dropped."""
    from datetime import datetime, timedelta, timezone

    store.record_event(annotation_event(1, 10, choices("World")))
    store.record_event({"action": "TASKS_DELETED", "tasks": [{"id": 10}], "project": project()})
    deleted = time.time()
    assert store.record_event(annotation_event(1, 10, choices("World"), updated=5)).changed == 0  # late: still gone
    assert store.record_event(annotation_event(2, 10, choices("Sports"))).changed == 0  # made before the deletion
    fresh = annotation_event(7, 10, choices("Business"))
    fresh["annotation"]["created_at"] = fresh["annotation"]["updated_at"] = (
        datetime.now(timezone.utc) + timedelta(seconds=1)).isoformat().replace("+00:00", "Z")
    assert store.record_event(fresh).changed == 1
    assert labels_of(store) == {10: ("Business",)} and store.annotation_ids(KEY) == {7}
    assert store.deleted_task_ids(KEY) == {10} and store.deleted_task_ids(KEY, since=deleted + 0.5) == set()
    # the new task deleted in turn: its label goes, and a replay of it stays out
    time.sleep(1.1)
    assert store.record_event({"action": "TASKS_DELETED", "tasks": [{"id": 10}], "project": project()}).changed == 1
    assert store.record_event(fresh).changed == 0 and labels_of(store) == {}


def test_an_annotation_id_label_studio_gives_again_is_a_new_annotation(store):
    """Label Studio on SQLite (its default) numbers imported annotations from the newest one there
    (``latest('id') + 1``), so the id of a deleted newest annotation comes back on the next import.
    The tombstone was final, and the imported label was refused for good, by webhooks and syncs."""
    from ls_backend.store import AnnotationRecord, ProjectInfo

    store.record_event(annotation_event(1, 10, choices("World")))
    store.record_event(annotation_event(2, 11, choices("Sports"), updated=30))
    store.record_event(deleted_event(2))
    # a late event of the deleted annotation, even one stamped later, stays out
    assert store.record_event(annotation_event(2, 11, choices("Business"), action="ANNOTATION_UPDATED",
                                               updated=90)).changed == 0
    imported = annotation_event(2, 12, choices("Business"), updated=60)  # the import: another task
    imported["annotation"]["created_at"] = stamp(60)
    outcome = store.record_event(imported)
    assert outcome.changed == 1 and outcome.stored_annotations == 2
    assert labels_of(store) == {10: ("World",), 12: ("Business",)}
    assert store.project_summary(KEY).deleted == 0
    # the old annotation's late events still lose: ordered behind the new one's updated_at
    assert store.record_event(annotation_event(2, 11, choices("World"), updated=30)).changed == 0
    # deleted in turn, its id is buried again, and a replay of it stays out
    assert store.record_event(deleted_event(2)).changed == 1
    assert store.record_event(imported).changed == 0 and labels_of(store) == {10: ("World",)}
    # a sync reads the same rule: an id given again on the same task, made after the deleted one's last change
    again = annotation_event(2, 12, choices("World"), updated=120)
    again["annotation"]["created_at"] = stamp(120)
    counts = store.ingest(ProjectInfo.from_payload(project()),
                          [AnnotationRecord.from_payload(again["annotation"], again["task"], 3)])
    assert (counts.inserted, counts.tombstoned) == (1, 0) and labels_of(store) == {10: ("World",), 12: ("World",)}


def test_a_deleted_task_and_annotation_given_again_keep_their_label_whichever_clock_runs_ahead(store):
    """Tasks deleted, then pre-annotated tasks imported: Label Studio on SQLite gives both ids again.
    The new label was kept only where Label Studio's clock stamped it later than this machine's
    clock stamped the deletion; with Label Studio's clock behind, it was dropped for good."""
    store.record_event(annotation_event(1, 10, choices("World"), updated=30))
    store.record_event({"action": "TASKS_DELETED", "tasks": [{"id": 10}], "project": project()})
    # (the test's Label Studio clock reads 2026-11-27 01:00, well behind this machine's)
    assert store.record_event(annotation_event(1, 10, choices("World"), updated=40)).changed == 0  # late: stays out
    imported = annotation_event(1, 10, choices("Sports"), updated=45)
    imported["annotation"]["created_at"] = stamp(45)  # after the deleted label's last change
    assert store.record_event(imported).changed == 1
    assert labels_of(store) == {10: ("Sports",)}


def test_bulk_created_annotations_are_stored(store):
    proj = project()
    events = [annotation_event(i, 100 + i, choices("Business")) for i in (1, 2)]
    payload = {
        "action": "ANNOTATIONS_CREATED",
        "annotation": [e["annotation"] for e in events],
        "task": [e["task"] for e in events],
        "project": proj,
    }
    assert store.record_event(payload).changed == 2
    assert labels_of(store) == {101: ("Business",), 102: ("Business",)}


def test_start_training_is_recorded_as_a_trigger(store):
    outcome = store.record_event({"action": "START_TRAINING", "project": project()})
    assert outcome.trigger and outcome.project_key == KEY and outcome.changed == 0
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(store_module.triggers.c.project_key, store_module.triggers.c.action)).all()
    assert [tuple(r) for r in rows] == [(KEY, "START_TRAINING")]


def test_other_actions_are_answered_and_not_kept(store):
    outcome = store.record_event({"action": "LABEL_LINK_CREATED", "label_link": []})
    assert (outcome.recorded, outcome.project_key, outcome.changed) == (False, None, 0)
    assert store.projects() == []
    # a project object on an action we do not keep still tells how far behind we are
    store.record_event(annotation_event(1, 10, choices("World")))
    tasks = store.record_event({"action": "TASKS_CREATED", "tasks": [], "project": project(total=5)})
    assert (tasks.recorded, tasks.ls_annotations, tasks.stored_annotations, tasks.behind) == (False, 5, 1, True)


# -- malformed payloads: a clear reason, nothing written ------------------------------------
@pytest.mark.parametrize(
    "payload, reason",
    [
        ({"annotation": {}}, "action"),
        ({"action": "ANNOTATION_CREATED", "annotation": {"id": 1}}, "names no project"),
        ({"action": "ANNOTATION_CREATED", "project": {"id": 3}}, "created_at"),
        ({"action": "ANNOTATION_CREATED", "project": {"id": 3, "created_at": "yesterday"}}, "ISO-8601"),
        ({"action": "START_TRAINING", "project": {"id": "three", "created_at": "2026-11-27T00:54:22Z"}}, "integer"),
        ({"action": "ANNOTATION_CREATED", "project": project()}, "'annotation' must be an object"),
        ({"action": "ANNOTATIONS_DELETED", "annotations": "1,2", "project": project()}, "list"),
    ],
)
def test_malformed_payloads_raise_bad_event_and_write_nothing(store, payload, reason):
    with pytest.raises(BadEvent) as caught:
        store.record_event(payload)
    assert reason in caught.value.message
    assert isinstance(caught.value, ValueError)
    assert store.projects() == []


def test_a_malformed_entry_of_a_bulk_event_costs_only_itself(store):
    """Label Studio does not send a webhook again: the well-formed annotations of a bulk event
    must be stored even when one beside them is not; the outcome names the one left out."""
    good = [annotation_event(i, 10 + i, choices("World")) for i in (1, 3)]
    bad = annotation_event(2, 12, "not a list")  # type: ignore[arg-type]
    payload = {"action": "ANNOTATIONS_CREATED", "annotation": [good[0]["annotation"], bad["annotation"], good[1]["annotation"]],
               "task": [good[0]["task"], bad["task"], good[1]["task"]], "project": project()}
    outcome = store.record_event(payload)
    assert outcome.changed == 2 and len(outcome.rejected) == 1
    assert outcome.rejected[0].startswith("annotation[1]: annotation 2: 'result'")
    assert labels_of(store) == {11: ("World",), 13: ("World",)}
    # deletions alike: the annotations and tasks with usable ids are deleted
    outcome = store.record_event({"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 1}, {"id": "x"}, {}],
                                  "project": project()})
    assert outcome.changed == 1 and [r.split(":")[0] for r in outcome.rejected] == ["annotations[1]", "annotations[2]"]
    assert labels_of(store) == {13: ("World",)}
    outcome = store.record_event({"action": "TASKS_DELETED", "tasks": [{"id": [13]}, {"id": 13}], "project": project()})
    assert outcome.changed == 1 and len(outcome.rejected) == 1 and labels_of(store) == {}


def test_a_bulk_event_without_one_well_formed_entry_is_refused_and_writes_nothing(store):
    bad = [annotation_event(i, 10 + i, "not a list") for i in (1, 2)]  # type: ignore[arg-type]
    payload = {"action": "ANNOTATIONS_CREATED", "annotation": [e["annotation"] for e in bad],
               "task": [e["task"] for e in bad], "project": project()}
    with pytest.raises(BadEvent, match="no entry is well formed; the first: annotation\\[0\\]: annotation 1: 'result'"):
        store.record_event(payload)
    with pytest.raises(BadEvent, match="has no 'id'"):
        store.record_event({"action": "TASKS_DELETED", "tasks": [{}], "project": project()})
    assert store.projects() == []


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda e: e["annotation"].update(project=4), "belongs to project 4"),
        (lambda e: e["annotation"].update(task=11), "is on task 11"),
        (lambda e: e["annotation"].pop("id"), "annotation.id"),
        (lambda e: e["annotation"].update(updated_at="soon", created_at=None), "updated_at"),
        (lambda e: e.pop("task"), "'task' object"),
        (lambda e: e["task"].update(data="text"), "'data' must be an object"),
        (lambda e: e["annotation"].update(id=True), "integer id"),
    ],
)
def test_inconsistent_annotation_events_are_refused(store, change, reason):
    event = annotation_event(1, 10, choices("World"))
    change(event)
    with pytest.raises(BadEvent, match=reason):
        store.record_event(event)
    assert store.projects() == []


# -- the training view ------------------------------------------------------------------------
def test_ground_truth_then_majority_then_latest(store):
    # task 10: ground truth beats a later majority
    store.record_event(annotation_event(1, 10, choices("World"), annotator=1, ground_truth=True))
    store.record_event(annotation_event(2, 10, choices("Sports"), annotator=2, updated=10))
    store.record_event(annotation_event(3, 10, choices("Sports"), annotator=3, updated=20))
    # task 11: majority (two annotators) beats the latest single vote
    store.record_event(annotation_event(4, 11, choices("Business"), annotator=1))
    store.record_event(annotation_event(5, 11, choices("Business"), annotator=2, updated=5))
    store.record_event(annotation_event(6, 11, choices("World"), annotator=3, updated=30))
    # task 12: a tie goes to the latest
    store.record_event(annotation_event(7, 12, choices("Business"), annotator=1, updated=50))
    store.record_event(annotation_event(8, 12, choices("World"), annotator=2, updated=40))
    # task 13: one annotator's second annotation replaces their first vote
    store.record_event(annotation_event(9, 13, choices("World"), annotator=1))
    store.record_event(annotation_event(10, 13, choices("Sports"), annotator=1, updated=10))
    store.record_event(annotation_event(11, 13, choices("World"), annotator=2, updated=5))
    examples = {e.task_id: e for e in store.training_examples(KEY, TOPIC)}
    assert {t: e.labels for t, e in examples.items()} == {
        10: ("World",),
        11: ("Business",),
        12: ("Business",),
        13: ("Sports",),
    }
    assert examples[10].annotation_id == 1 and examples[11].annotation_id == 5
    assert examples[10].text == "text of 10"
    assert all(e.seq > 0 for e in examples.values())


def test_several_choices_in_a_single_choice_control_are_left_out_not_read_as_the_first(store):
    """Annotations made under choice="multiple" (or imported) after the control became single: which
    choice is meant is unknown; they trained as the first choice in config order."""
    store.record_event(annotation_event(1, 10, choices("Sports", "World"), annotator=1))  # two: left out
    store.record_event(annotation_event(2, 11, choices("Sports", "World"), annotator=1))
    store.record_event(annotation_event(3, 11, choices("Sports"), annotator=2, updated=5))  # a vote that counts
    examples = {e.task_id: e.labels for e in store.training_examples(KEY, TOPIC)}
    assert examples == {11: ("Sports",)}


def test_cancelled_and_empty_annotations_are_skipped(store):
    store.record_event(annotation_event(1, 10, choices("World"), cancelled=True))
    store.record_event(annotation_event(2, 11, []))
    store.record_event(annotation_event(3, 12, choices("Sports", control="other")))
    store.record_event(annotation_event(4, 13, choices("World"), cancelled=True, annotator=1))
    store.record_event(annotation_event(5, 13, choices("Sports"), annotator=2))
    assert labels_of(store) == {13: ("Sports",)}
    summary = store.project_summary(KEY)
    assert (summary.annotations, summary.cancelled) == (3, 2)
    assert store.stored_annotations(KEY) == 3


def test_labels_no_longer_in_the_config_are_dropped_with_a_log_line(store, caplog):
    store.record_event(annotation_event(1, 10, choices("World")))
    store.record_event(annotation_event(2, 11, choices("Gossip")))
    with caplog.at_level(logging.INFO, logger="ls_backend.store"):
        assert labels_of(store) == {10: ("World",)}
    assert "'Gossip' x1" in caplog.text and "dropped from training" in caplog.text


def test_multiple_choices_are_kept_in_config_order(store):
    config = TOPIC_CONFIG.replace('choice="single"', 'choice="multiple"')
    proj = project(config=config)
    store.record_event(annotation_event(1, 10, choices("Sports", "World", "Gossip"), proj=proj))
    control = plan_for(config).control("topic")
    assert labels_of(store, control=control) == {10: ("World", "Sports")}


def test_text_comes_from_the_controls_field_and_tasks_without_it_are_skipped(store):
    store.record_event(annotation_event(1, 10, choices("World"), text="Markets rallied"))
    event = annotation_event(2, 11, choices("World"))
    event["task"]["data"] = {"body": "elsewhere"}
    store.record_event(event)
    assert [(e.task_id, e.text) for e in store.training_examples(KEY, TOPIC)] == [(10, "Markets rallied")]


def test_labels_controls_give_no_examples_yet_but_their_raw_results(store):
    proj = project(config=NER_AND_TOPIC_CONFIG)
    text = "Ada Lovelace met Babbage"
    result = choices("World") + [span(0, 12, "Ada Lovelace", "PER")]
    store.record_event(annotation_event(1, 10, result, text=text, proj=proj))
    store.record_event(annotation_event(2, 10, [span(17, 24, "Babbage", "PER")], text=text, proj=proj, updated=9))
    plan = plan_for(NER_AND_TOPIC_CONFIG)
    assert store.training_examples(KEY, plan.control("ner")) == []
    assert store.annotation_results(KEY, "ner") == [(10, text, [span(17, 24, "Babbage", "PER")])]
    summary = store.project_summary(KEY)
    assert summary.labels == {"topic": {"World": 1, "Sports": 0}, "ner": {"PER": 1, "ORG": 0}}


# -- counters -----------------------------------------------------------------------------------
def test_change_counters_and_the_training_mark(store):
    assert (store.current_seq(KEY), store.changes_since(KEY, 0), store.trained_seq(KEY)) == (0, 0, 0)
    store.record_event(annotation_event(1, 10, choices("World")))
    store.record_event(annotation_event(2, 10, choices("World"), annotator=2))
    last = store.record_event(annotation_event(3, 11, choices("World")))
    assert store.changes_since(KEY, 0) == 2  # distinct tasks
    assert last.labels_since_training == store.labels_since_training(KEY) == 2
    mark = store.current_seq(KEY)
    store.mark_trained(KEY, mark)
    assert (store.trained_seq(KEY), store.labels_since_training(KEY)) == (mark, 0)
    store.record_event(annotation_event(1, 10, choices("World")))  # replay: no change
    store.record_event(annotation_event(4, 12, choices("World"), cancelled=True))  # skipped: not relevant
    assert store.labels_since_training(KEY) == 0 and store.current_seq(KEY) == mark
    store.record_event(annotation_event(3, 11, choices("Sports"), action="ANNOTATION_UPDATED", updated=5))
    store.record_event(deleted_event(2))
    assert store.labels_since_training(KEY) == 2
    assert store.current_seq(KEY) > mark
    store.mark_trained(KEY, mark - 1)  # the mark never moves back
    assert store.trained_seq(KEY) == mark
    with pytest.raises(UnknownProject):
        store.mark_trained("9.1", 1)


def test_label_config_snapshots_follow_the_projects_updated_at(store):
    store.record_event(annotation_event(1, 10, choices("World")))
    newer = TOPIC_CONFIG.replace('<Choice value="World"/>', '<Choice value="World"/><Choice value="Health"/>')
    store.record_event({"action": "PROJECT_UPDATED", "project": project(config=newer, updated=100)})
    assert store.latest_label_config(KEY) == newer
    store.record_event(annotation_event(2, 11, choices("World")))  # carries the older config (updated=0)
    assert store.latest_label_config(KEY) == newer
    assert store.project_summary(KEY).label_configs == 2
    assert store.latest_label_config("9.1") is None


def test_project_lookup_by_key_or_unambiguous_id(store):
    store.record_event(annotation_event(1, 10, choices("World")))
    assert store.resolve_project(KEY) == KEY
    assert store.resolve_project("3") == KEY
    with pytest.raises(UnknownProject, match="no project '4'"):
        store.resolve_project("4")
    other = project(created_at="2025-01-01T00:00:00.000001Z")  # same id in another Label Studio
    store.record_event(annotation_event(1, 10, choices("World"), proj=other))
    with pytest.raises(UnknownProject, match="ambiguous"):
        store.resolve_project("3")
    assert len(store.projects()) == 2


def test_setup_remembers_how_to_reach_label_studio(store):
    store.note_setup(KEY, TOPIC_CONFIG, "http://ls.example:8080/", "secret-token")
    assert store.connection_of(KEY) == ("http://ls.example:8080", "secret-token")
    assert store.latest_label_config(KEY) == TOPIC_CONFIG
    assert store.resolve_project("3") == KEY
    store.record_event(annotation_event(1, 10, choices("World")))
    summary = store.project_summary(KEY)
    assert summary.title == "topics" and summary.annotations == 1
    assert "secret-token" not in repr(summary.to_dict())


def test_project_summary(store):
    store.record_event(annotation_event(1, 10, choices("World")))
    store.record_event(annotation_event(2, 11, choices("Sports"), cancelled=True))
    store.record_event(deleted_event(5))
    summary = store.project_summary(KEY).to_dict()
    assert summary["labels"] == {"topic": {"World": 1, "Sports": 0, "Business": 0, "Sci/Tech": 0}}
    assert (summary["annotations"], summary["cancelled"], summary["deleted"], summary["tasks"]) == (1, 1, 1, 1)
    assert summary["labels_since_training"] == 1 and summary["last_event_at"].endswith("Z")
    with pytest.raises(UnknownProject):
        store.project_summary("9.1")


# -- sync support ---------------------------------------------------------------------------------
def test_sync_lease_is_exclusive_until_released(store):
    store.record_event(annotation_event(1, 10, choices("World")))
    assert store.claim_sync(KEY, 60)
    assert not store.claim_sync(KEY, 60)
    store.finish_sync(KEY, {"inserted": 1})
    assert store.claim_sync(KEY, 60)
    store.finish_sync(KEY, None)
    assert store.project_summary(KEY).last_sync == {"inserted": 1}


def _claimed_by_a_process_that_exits(url: str) -> int:
    """A child process takes the project's sync lease and exits without letting go (as one killed
    with SIGKILL does); its pid, not yet reaped."""
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        code = 1
        try:
            other = CorrectionStore(url)
            code = 0 if other.claim_sync(KEY, 900) else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until it exited, leaving it a zombie
        state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "Z":
            return child
        time.sleep(0.05)
    raise AssertionError("the child never exited")


@pytest.mark.skipif(not Path("/proc/self/ns/pid").exists(), reason="process identity is read from Linux's /proc")
def test_a_sync_lease_whose_holder_died_is_taken_at_once(store, url):
    store.record_event(annotation_event(1, 10, choices("World")))
    child = _claimed_by_a_process_that_exits(url)
    try:
        assert store.claim_sync(KEY, 60)  # its holder exited: a zombie no one reaped yet
    finally:
        _pid, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0  # the child did hold the lease
    assert not store.claim_sync(KEY, 60)  # this process holds it now, and is alive
    store.finish_sync(KEY)
    child = _claimed_by_a_process_that_exits(url)
    os.waitpid(child, 0)
    assert store.claim_sync(KEY, 60)  # its holder is gone altogether


def test_a_sync_lease_held_elsewhere_or_taken_over_stays_its_holders(store):
    store.record_event(annotation_event(1, 10, choices("World")))
    ours = store.claim_sync(KEY, 60)
    with store.engine.begin() as conn:  # a process of another machine (or container) holds it
        conn.execute(store_module.projects.update().values(sync_lease_holder="other-host|0b1d|pid:[1]|7|1|ab"))
    assert not store_module.holder_gone("other-host|0b1d|pid:[1]|7|1|ab")
    assert not store.claim_sync(KEY, 60)  # it cannot be told dead: it holds until the lease runs out
    store.finish_sync(KEY, holder=ours)  # ours ran out and was taken: letting go of it keeps theirs
    assert not store.claim_sync(KEY, 60)
    with store.engine.begin() as conn:
        conn.execute(store_module.projects.update().values(sync_lease_until=time.time() - 1))
    again = store.claim_sync(KEY, 60)  # run out: free
    assert again and not store_module.holder_gone(again)  # (this process: alive)
    store.finish_sync(KEY, holder=again)
    assert store.claim_sync(KEY, 60)


def test_ingest_and_delete_keep_the_same_rules(store):
    from ls_backend.store import AnnotationRecord, ProjectInfo

    info = ProjectInfo.from_payload(project())
    event = annotation_event(1, 10, choices("World"))
    record = AnnotationRecord.from_payload(event["annotation"], event["task"])
    counts = store.ingest(info, [record, record])
    assert (counts.inserted, counts.updated, counts.unchanged) == (1, 0, 1)  # the second copy changes nothing
    assert store.annotation_ids(KEY) == {1}
    assert store.annotation_ids(KEY, up_to_seq=0) == set()
    assert store.delete_annotations(KEY, [1]) == 1
    assert store.ingest(info, [record]).tombstoned == 1
    assert store.stored_annotations(KEY) == 0


# -- concurrency and schema ------------------------------------------------------------------------
def test_concurrent_writers_lose_nothing(store):
    errors: list[BaseException] = []

    def write(worker: int) -> None:
        try:
            for i in range(25):
                annotation_id = worker * 1000 + i
                store.record_event(annotation_event(annotation_id, annotation_id, choices("World")))
                store.record_event(annotation_event(annotation_id, annotation_id, choices("World")))  # replay
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert store.stored_annotations(KEY) == 200
    assert len(store.training_examples(KEY, TOPIC)) == 200
    assert store.changes_since(KEY, 0) == 200


def test_migrations_are_recorded_and_run_once(url):
    stores = [CorrectionStore(url) for _ in range(3)]
    with stores[0].engine.connect() as conn:
        versions = conn.execute(sa.select(store_module.schema_version.c.version)).scalars().all()
    assert versions == [number for number, _name, _apply in store_module.MIGRATIONS]
    for opened in stores:
        opened.close()


def test_a_version_1_store_is_migrated_with_its_data(url, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:1])
        patch.setattr(store_module, "SCHEMA_VERSION", 1)
        old = CorrectionStore(url)
    with old.engine.begin() as conn:  # what version 1 wrote: a project trained up to seq 2 and its change log
        conn.execute(sa.text(
            "INSERT INTO projects (key, ls_id, title, created_at, first_seen, last_seq, trained_seq, live_annotations) "
            f"VALUES ('{KEY}', 3, 'old', '', 0, 4, 2, 0)"
        ))
        for seq, task in ((1, 10), (2, 11), (3, 11), (4, 12), (4, 13)):
            conn.execute(sa.text(f"INSERT INTO changes (project_key, seq, task_id) VALUES ('{KEY}', {seq}, {task})"))
    old.close()
    migrated = CorrectionStore(url)
    try:
        assert (migrated.changes_since(KEY, 0), migrated.changes_since(KEY, 3)) == (4, 2)
        assert migrated.labels_since_training(KEY) == 3  # tasks 11, 12, 13
        assert migrated.labels_since_full_training(KEY) == 3  # the full lane's mark starts at the project's
        outcome = migrated.record_event(annotation_event(1, 14, choices("World")))
        assert outcome.labels_since_training == 4 and migrated.project_summary(KEY).title == "topics"
    finally:
        migrated.close()


def test_a_version_3_stores_tombstones_stay_final_for_their_task_after_the_migration(url, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:3])
        patch.setattr(store_module, "SCHEMA_VERSION", 3)
        old = CorrectionStore(url)
    with old.engine.begin() as conn:  # what version 3 wrote for a deleted annotation: no time of Label Studio's
        conn.execute(sa.text("INSERT INTO tombstones (project_key, annotation_id, task_id, deleted_at, seq) "
                             f"VALUES ('{KEY}', 1, 10, 0, 99)"))
    old.close()
    migrated = CorrectionStore(url)
    try:
        late = annotation_event(1, 10, choices("Sports"), updated=60)
        late["annotation"]["created_at"] = stamp(60)
        assert migrated.record_event(late).changed == 0  # its task's events: as final as before
        assert migrated.record_event(annotation_event(1, 12, choices("Sports"))).changed == 1  # another task: new
        assert labels_of(migrated) == {12: ("Sports",)}
    finally:
        migrated.close()


def test_a_store_newer_than_the_code_is_refused(url, monkeypatch):
    CorrectionStore(url).close()
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", 0)
    with pytest.raises(StoreError, match="newer than this ls-backend"):
        CorrectionStore(url)


def test_sqlite_runs_in_wal_mode_and_queues_writers_on_a_file_lock(tmp_path):
    opened = CorrectionStore(f"sqlite:///{tmp_path / 'store.sqlite'}")
    with opened.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
    opened.record_event(annotation_event(1, 10, choices("World")))
    assert (tmp_path / "store.sqlite.writers").exists()
    opened.close()


def test_from_settings_puts_sqlite_under_model_dir(tmp_path):
    from ls_backend.settings import Settings

    opened = CorrectionStore.from_settings(Settings(model_dir=tmp_path / "models"))
    assert (tmp_path / "models" / "store.sqlite").exists()
    opened.close()


def test_database_urls():
    assert database_url("postgresql://u:p@h:5432/db") == "postgresql+psycopg://u:p@h:5432/db"
    assert database_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert database_url("postgresql+psycopg://h/db") == "postgresql+psycopg://h/db"
    with pytest.raises(StoreError, match="not supported"):
        database_url("mysql://h/db")


def test_settings_read_database_url():
    from ls_backend.settings import Settings, SettingsError

    settings = Settings.from_env({"DATABASE_URL": "postgresql://u:pw@h/db", "SYNC_CHECK_INTERVAL": "60"})
    assert settings.database_url == "postgresql://u:pw@h/db" and settings.sync_check_interval == 60
    assert settings.describe()["database_url"] == "postgresql://u:***@h/db"
    with pytest.raises(SettingsError, match="DATABASE_URL"):
        Settings.from_env({"DATABASE_URL": "mysql://h/db"})


def test_concurrent_events_share_commits_and_one_failure_spoils_no_other(store, monkeypatch):
    real_upsert = store_module._ProjectWork.upsert
    batches: list[int] = []
    real_together = store._record_together

    release = threading.Event()

    first: list[int] = []

    def counting(batch):
        if not batches and not first:  # the first transaction waits until the other events queue behind it
            first.append(len(batch))
            release.wait(30)
        batches.append(len(batch))
        return real_together(batch)

    def flaky(work, record, *args):
        if record.annotation_id == 13:
            raise RuntimeError("a bug in one event")
        return real_upsert(work, record, *args)

    monkeypatch.setattr(store_module._ProjectWork, "upsert", flaky)
    monkeypatch.setattr(store, "_record_together", counting)
    failures: list[int] = []

    def send(annotation_id: int) -> None:
        try:
            store.record_event(annotation_event(annotation_id, annotation_id, choices("World")))
        except RuntimeError:
            failures.append(annotation_id)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(1, 41)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while (not first or store._group._queue.qsize() < 40 - first[0]) and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    for t in threads:
        t.join()
    assert failures == [13]
    assert store.annotation_ids(KEY) == set(range(1, 41)) - {13}
    assert store.stored_annotations(KEY) == 39
    # the events that waited went in one transaction (then one by one: 13 failed in it)
    assert batches[1] == 40 - batches[0] and batches[1] > 1, batches


def test_text_no_utf8_column_can_hold_is_kept_exactly(store):
    """On SQLite and PostgreSQL alike: a lone surrogate in the task text (valid JSON) and a NUL in
    the title or annotator (PostgreSQL refuses NUL in text) cost no annotation."""
    text = "half \ud800 of a pair and a \x00 NUL"
    event = annotation_event(1, 10, choices("World"), text=text)
    event["project"] = {**event["project"], "title": "t\x00\udfff"}
    event["annotation"]["completed_by"] = "a\x00b"
    assert store.record_event(event).changed == 1
    assert [(e.text, e.labels) for e in store.training_examples(KEY, TOPIC)] == [(text, ("World",))]
    assert store.project_summary(KEY).title == "t\ufffd?"


def test_skipped_tasks_are_listed_apart_from_labeled_ones(store):
    store.record_event(annotation_event(1, 10, choices("World")))
    store.record_event(annotation_event(2, 11, [], cancelled=True))
    store.record_event(annotation_event(3, 12, [], cancelled=True))
    store.record_event(deleted_event(3))
    assert store.skipped_task_ids(KEY) == {11}


def test_a_project_created_at_with_many_fraction_digits_costs_no_annotation(store):
    """Python reads any number of fractional-second digits; the stored copy fits its 64-character
    column on PostgreSQL as on SQLite."""
    created = "2026-11-27T00:54:22." + "4" * 70 + "Z"
    event = annotation_event(1, 10, choices("World"))
    event["project"] = project(created_at=created)
    outcome = store.record_event(event)
    assert outcome.changed == 1 and len(labels_of(store, outcome.project_key)) == 1
