"""Replayed, reordered and duplicated webhook events end in the same store state."""

from __future__ import annotations

import itertools
import json

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ls_backend import store as store_module
from ls_backend.labeling import plan_for
from ls_backend.store import CorrectionStore
from tests.support.events import TOPIC_CONFIG, annotation_event, choices, deleted_event, key_of, project
from tests.support.stores import BACKENDS, store_url

CONFIGS = (TOPIC_CONFIG, TOPIC_CONFIG.replace('<Choice value="Sports"/>', ""))
TOPIC = plan_for(TOPIC_CONFIG).control("topic")
_project_ids = itertools.count(1000)

upserts = st.builds(
    lambda annotation_id, choice, updated, cancelled, truth, annotator, config, action: (
        "upsert", annotation_id, choice, updated, cancelled, truth, annotator, config, action
    ),
    annotation_id=st.integers(1, 5),
    choice=st.sampled_from(["World", "Sports", "Business", "Gossip"]),
    updated=st.integers(0, 4),  # few distinct times: ties happen
    cancelled=st.booleans(),
    truth=st.booleans(),
    annotator=st.integers(1, 3),
    config=st.integers(0, 1),
    action=st.sampled_from(["ANNOTATION_CREATED", "ANNOTATION_UPDATED"]),
)
deletes = st.builds(lambda ids: ("delete", tuple(sorted(ids))), st.sets(st.integers(1, 6), min_size=1, max_size=3))
task_deletes = st.builds(lambda task: ("tasks", task), st.integers(10, 12))
config_changes = st.builds(lambda config, updated: ("config", config, updated), st.integers(0, 1), st.integers(0, 4))
# a deleted task is final, as a deleted annotation is: replays and reorders of its events end alike
operations = st.lists(st.one_of(upserts, upserts, upserts, deletes, task_deletes, config_changes), min_size=1, max_size=14)
with_task_deletes = st.lists(st.one_of(upserts, upserts, upserts, deletes, task_deletes, config_changes),
                             min_size=1, max_size=16)


def payload(op: tuple, project_id: int) -> dict:
    if op[0] == "upsert":
        _, annotation_id, choice, updated, cancelled, truth, annotator, config, action = op
        proj = project(project_id, config=CONFIGS[config])
        return annotation_event(annotation_id, 10 + annotation_id % 3, choices(choice), action=action, updated=updated,
                                cancelled=cancelled, ground_truth=truth, annotator=annotator, proj=proj)
    if op[0] == "delete":
        return deleted_event(*op[1], proj=project(project_id))
    if op[0] == "tasks":
        return {"action": "TASKS_DELETED", "tasks": [{"id": op[1]}], "project": project(project_id)}
    _, config, updated = op
    return {"action": "PROJECT_UPDATED", "project": project(project_id, config=CONFIGS[config], updated=updated)}


def state(store: CorrectionStore, key: str) -> dict:
    a, t, p = store_module.annotations, store_module.tombstones, store_module.projects
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(a.c.annotation_id, a.c.task_id, a.c.task_data, a.c.result, a.c.annotator, a.c.was_cancelled,
                      a.c.ground_truth, a.c.updated_us, a.c.content_hash)
            .where(a.c.project_key == key)
            .order_by(a.c.annotation_id)
        ).all()
        buried = conn.execute(
            sa.select(t.c.annotation_id).where(t.c.project_key == key).order_by(t.c.annotation_id)
        ).scalars().all()
        live = conn.execute(sa.select(p.c.live_annotations).where(p.c.key == key)).scalar()
        dead_tasks = sorted(store.deleted_task_ids(key))
    assert live == sum(1 for row in rows if not row.was_cancelled)  # the kept counter agrees with the rows
    return {
        "annotations": [tuple(row) for row in rows],
        "tombstones": list(buried),
        "deleted_tasks": dead_tasks,
        "live": live,
        "config": store.latest_label_config(key),
        "examples": [(e.task_id, e.text, e.labels, e.annotation_id) for e in store.training_examples(key, TOPIC)],
        "results": json.dumps(store.annotation_results(key, "topic", "text")),
    }


@pytest.fixture(scope="module", params=BACKENDS)
def shared_store(request, tmp_path_factory):
    with store_url(request.param, tmp_path_factory.mktemp("props")) as url:
        opened = CorrectionStore(url)
        yield opened
        opened.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations, data=st.data())
def test_replays_reorders_and_duplicates_end_in_the_same_state(shared_store, ops, data):
    shuffled = data.draw(st.permutations(ops), label="reordered")
    extra = data.draw(st.lists(st.sampled_from(ops), max_size=6), label="duplicated")
    replayed = list(shuffled)
    for op in extra:  # duplicates land anywhere, before or after the original
        replayed.insert(data.draw(st.integers(0, len(replayed)), label="at"), op)

    first, second = next(_project_ids), next(_project_ids)
    for op in ops:
        shared_store.record_event(payload(op, first))
    for op in replayed:
        shared_store.record_event(payload(op, second))
    for op in ops:  # replaying everything once more changes nothing
        assert shared_store.record_event(payload(op, first)).changed == 0
    assert state(shared_store, key_of(first)) == state(shared_store, key_of(second))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=with_task_deletes, data=st.data())
def test_events_written_together_end_as_written_one_by_one(shared_store, ops, data):
    """Group commit puts concurrent events in one transaction: the result must not depend on the grouping."""
    from ls_backend.store import parse_event

    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(ops) - 1)), max_size=4), label="cuts"))
    first, second = next(_project_ids), next(_project_ids)
    singles = [shared_store._record_together([parse_event(payload(op, first))]) for op in ops]
    grouped: list = []
    for start, end in zip([0, *cuts], [*cuts, len(ops)]):
        grouped += shared_store._record_together([parse_event(payload(op, second)) for op in ops[start:end]])
    assert [o.changed for batch in singles for o in batch] == [o.changed for o in grouped]
    assert state(shared_store, key_of(first)) == state(shared_store, key_of(second))
    assert shared_store.changes_since(key_of(first), 0) == shared_store.changes_since(key_of(second), 0)
