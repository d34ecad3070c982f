"""Reconciling the store with Label Studio's answers (the end-to-end test does it against a real Label Studio)."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest

from ls_backend.settings import Settings
from ls_backend.store import CorrectionStore, ProjectInfo
from ls_backend.sync import LabelStudioSource, SyncError, source_for, sync_project
from tests.support.events import annotation_event, choices, deleted_event, key_of, project
from tests.support.stores import BACKENDS, store_url

KEY = key_of(3)


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path):
    with store_url(request.param, tmp_path) as url:
        opened = CorrectionStore(url)
        yield opened
        opened.close()


class FakeLabelStudio:
    """What a sync reads from Label Studio: the project, then (task id, data, annotations) per task."""

    url = "http://label-studio.test"

    def __init__(self, tasks: dict[int, list[dict]], gone: set[int] = frozenset(), during=None):
        self.tasks_by_id = tasks
        self.gone = set(gone)
        self.during = during
        self.checked: list[int] = []

    def project(self, ls_id: int) -> ProjectInfo:
        total = sum(1 for a in self.all() if not a["was_cancelled"])
        return ProjectInfo.from_payload({**project(ls_id), "total_annotations_number": total})

    def all(self) -> list[dict]:
        return [a for annotations in self.tasks_by_id.values() for a in annotations]

    def tasks(self, ls_id: int, page_size: int = 500):
        for n, (task_id, annotations) in enumerate(sorted(self.tasks_by_id.items())):
            if n == 1 and self.during:
                self.during()
            yield task_id, {"text": f"text of {task_id}"}, annotations

    def annotation_gone(self, annotation_id: int) -> bool:
        self.checked.append(annotation_id)
        return annotation_id in self.gone


def api_annotation(annotation_id: int, task_id: int, label: str, updated: float = 0, cancelled: bool = False) -> dict:
    event = annotation_event(annotation_id, task_id, choices(label), updated=updated, cancelled=cancelled)
    return event["annotation"]


SETTINGS = Settings(label_studio_url="http://label-studio.test", label_studio_api_key="k")


def test_a_sync_inserts_updates_and_deletes_counted_exactly(store):
    for annotation_id, task_id in ((1, 10), (2, 11), (3, 12)):
        store.record_event(annotation_event(annotation_id, task_id, choices("World")))
    studio = FakeLabelStudio(
        {
            10: [api_annotation(1, 10, "Sports", updated=60)],  # changed while we were away
            11: [api_annotation(2, 11, "World")],  # as we hold it
            13: [api_annotation(4, 13, "Business"), api_annotation(5, 13, "World", cancelled=True)],  # new
        },
        gone={3},
    )
    report = sync_project(store, SETTINGS, "3", reason="test", source=studio)
    assert (report.inserted, report.updated, report.unchanged, report.deleted) == (2, 1, 1, 1)
    assert (report.tasks, report.annotations) == (3, 4)
    assert report.label_studio_annotations == report.stored_annotations == 3
    assert store.annotation_ids(KEY) == {1, 2, 4, 5}
    again = sync_project(store, SETTINGS, KEY, reason="test", source=studio)
    assert (again.inserted, again.updated, again.deleted, again.unchanged) == (0, 0, 0, 4)


def test_a_webhook_during_the_sync_is_not_taken_for_a_deletion(store):
    store.record_event(annotation_event(1, 10, choices("World")))
    studio = FakeLabelStudio(
        {10: [api_annotation(1, 10, "World")], 11: [api_annotation(2, 11, "World")]},
        during=lambda: store.record_event(annotation_event(9, 19, choices("Sports"))),
    )
    report = sync_project(store, SETTINGS, KEY, source=studio)
    assert report.deleted == 0 and studio.checked == []
    assert store.annotation_ids(KEY) == {1, 2, 9}


def test_a_config_change_during_a_sync_is_not_undone_by_it(store):
    """The sync reads the project (and its config) first, then pages through the tasks for
    minutes; a PROJECT_UPDATED webhook meanwhile brings a new config, which must stay."""
    import time
    from dataclasses import replace

    from tests.support.events import SENTIMENT_CONFIG, TOPIC_CONFIG

    class ReadNow(FakeLabelStudio):
        def project(self, ls_id):  # as LabelStudioSource: the API's config is the one in force
            return replace(super().project(ls_id), current=True)

    changed = {"action": "PROJECT_UPDATED", "project": {**project(3, config=SENTIMENT_CONFIG),
                                                        "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 1))}}
    store.record_event(annotation_event(1, 10, choices("World")))
    studio = ReadNow(
        {10: [api_annotation(1, 10, "World")], 11: [api_annotation(2, 11, "World")], 12: [api_annotation(3, 12, "Sports")]},
        during=lambda: store.record_event(changed),
    )
    assert studio.project(3).label_config == TOPIC_CONFIG
    report = sync_project(store, SETTINGS, KEY, source=studio)
    assert report.inserted == 2
    assert store.latest_label_config(KEY) == SENTIMENT_CONFIG
    # with no change meanwhile, what the API says wins, whatever the store held
    sync_project(store, SETTINGS, KEY, source=ReadNow({10: [api_annotation(1, 10, "World")]}))
    assert store.latest_label_config(KEY) == TOPIC_CONFIG


class ReadsConfig(FakeLabelStudio):
    """As LabelStudioSource: the API's config is the one in force, with no time of its own."""

    def __init__(self, config: str, during=None):
        super().__init__({})
        self.config, self.during_read = config, during

    def project(self, ls_id):
        if self.during_read:
            self.during_read()
        return replace(ProjectInfo.from_payload({**project(ls_id, config=self.config), "total_annotations_number": 0}),
                       updated_us=None, current=True)


def topic_config(first: str) -> str:
    from tests.support.events import TOPIC_CONFIG

    return TOPIC_CONFIG.replace('<Choice value="World"/>', f'<Choice value="{first}"/>')


@pytest.mark.parametrize("skew", [-3600, 3600])
def test_a_sync_applies_the_config_it_reads_whatever_label_studios_clock_says(store, skew):
    """Label Studio's clock an hour ahead of ours, or behind: the config a sync reads replaces the
    one held (whose webhook time is Label Studio's), for any pair of configs; and a change after the
    sync, stamped by Label Studio, replaces it in turn."""
    import time

    def ls_time(offset: float = 0) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + skew + offset))

    for n in range(4):  # which config wins must not hang on how their hashes sort
        key = key_of(30 + n)
        old, new, later = topic_config(f"Old{n}"), topic_config(f"New{n}"), topic_config(f"Later{n}")
        store.record_event({"action": "PROJECT_UPDATED", "project": {**project(30 + n, config=old), "updated_at": ls_time()}})
        sync_project(store, SETTINGS, key, source=ReadsConfig(new))
        assert store.latest_label_config(key) == new
        store.record_event({"action": "PROJECT_UPDATED", "project": {**project(30 + n, config=later), "updated_at": ls_time(2)}})
        assert store.latest_label_config(key) == later


def test_a_config_a_webhook_brings_while_the_sync_reads_the_project_stays(store):
    """The user saves a new config just after Label Studio answered the sync's read: the webhook's
    config is newer than the one read, and stays; so do the webhooks after it that carry it."""
    from tests.support.events import SENTIMENT_CONFIG, TOPIC_CONFIG

    store.record_event(annotation_event(1, 10, choices("World")))  # topic config, Label Studio time 0
    changed = project(3, config=SENTIMENT_CONFIG, updated=30)
    studio = ReadsConfig(TOPIC_CONFIG, during=lambda: store.record_event({"action": "PROJECT_UPDATED", "project": changed}))
    sync_project(store, SETTINGS, KEY, source=studio)
    assert store.latest_label_config(KEY) == SENTIMENT_CONFIG
    store.record_event(annotation_event(2, 11, choices("Positive", control="sentiment"), updated=40, proj=changed))
    assert store.latest_label_config(KEY) == SENTIMENT_CONFIG


def test_only_annotations_confirmed_gone_are_deleted(store):
    store.record_event(annotation_event(1, 10, choices("World")))
    store.record_event(annotation_event(2, 11, choices("World")))
    studio = FakeLabelStudio({}, gone={2})  # 1 is missing from the listing, but still there when asked
    report = sync_project(store, SETTINGS, KEY, source=studio)
    assert report.deleted == 1 and sorted(studio.checked) == [1, 2]
    assert store.annotation_ids(KEY) == {1}


def test_a_deletion_during_the_sync_stays_deleted(store):
    """The listing was read before the deletion: the annotation it shows is the deleted one."""
    store.record_event(annotation_event(1, 10, choices("World")))
    studio = FakeLabelStudio({10: [api_annotation(1, 10, "World")], 11: [api_annotation(2, 11, "World")]},
                             during=lambda: store.record_event(deleted_event(2)))
    report = sync_project(store, SETTINGS, KEY, source=studio)
    assert (report.inserted, report.kept_deleted) == (0, 1)
    assert store.annotation_ids(KEY) == {1}


def test_an_annotation_listed_under_an_id_deleted_before_the_sync_began_is_stored(store):
    """Label Studio (on SQLite) gives the id of its newest annotation, once deleted, to the next one,
    and the id of its last task deleted to the next task. Where the store heard of the deletion but
    never of the new annotation (its webhook lost, or made before the backend was connected), every
    sync counted it as deleted here and stored nothing: the label never trained, and the store stayed
    one behind Label Studio, so every webhook asked for another full sync."""
    store.record_event(annotation_event(1, 10, choices("World")))
    store.record_event(deleted_event(1))  # held, then deleted
    store.record_event(deleted_event(7))  # never held: its deletion is all the store heard of it
    store.record_event({"action": "TASKS_DELETED", "tasks": [{"id": 30}], "project": project()})
    studio = FakeLabelStudio({10: [api_annotation(1, 10, "Sports")], 20: [api_annotation(7, 20, "Sports")],
                              30: [api_annotation(9, 30, "Business")]})
    report = sync_project(store, SETTINGS, KEY, source=studio)
    assert (report.inserted, report.kept_deleted) == (3, 0)
    assert store.annotation_ids(KEY) == {1, 7, 9}
    assert report.stored_annotations == report.label_studio_annotations == 3


def test_a_webhook_under_an_id_whose_deletion_alone_was_heard_is_stored_when_made_after_it(store):
    from datetime import datetime, timedelta, timezone

    store.record_event(deleted_event(7))
    late = annotation_event(7, 20, choices("Sports"))  # a late event of the deleted one: made before
    assert store.record_event(late).changed == 0
    made = annotation_event(7, 20, choices("Sports"))
    after = (datetime.now(timezone.utc) + timedelta(seconds=5)).isoformat().replace("+00:00", "Z")
    made["annotation"]["created_at"] = made["annotation"]["updated_at"] = after
    assert store.record_event(made).changed == 1
    assert store.annotation_ids(KEY) == {7}


def test_a_project_of_another_label_studio_is_refused(store):
    other = project(3, created_at="2025-01-01T00:00:00Z")
    store.record_event(annotation_event(1, 10, choices("World"), proj=other))
    with pytest.raises(SyncError, match="another Label Studio instance"):
        sync_project(store, SETTINGS, key_of(3, "2025-01-01T00:00:00Z"), source=FakeLabelStudio({}))


def test_where_a_sync_reaches_label_studio(store):
    with pytest.raises(SyncError, match="set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY"):
        source_for(Settings(), store, KEY)
    store.note_setup(KEY, None, "http://studio.example:8080", "legacy-token")
    source = source_for(Settings(), store, KEY)
    assert source.url == "http://studio.example:8080"
    assert source_for(SETTINGS, store, KEY).url == "http://label-studio.test"


def after_of(query: str) -> int:
    """The task id a listing page asks to start after (the Data Manager filter the sync sends)."""
    import json

    body = json.loads(query)
    assert body["ordering"] == ["tasks:id"]
    (item,) = body["filters"]["items"]
    assert (item["filter"], item["operator"]) == ("filter:tasks:id", "greater")
    return int(item["value"])


def test_pages_stop_at_the_total_and_trimmed_annotations_fall_back_to_whole_tasks():
    full = api_annotation(1, 10, "World")
    calls = []

    def listing(*, project, fields, include, page, page_size, query):
        after = after_of(query)
        calls.append((after, include))
        annotation = full if include is None else {"id": 1}  # as if include= stripped them
        left = [t for t in (11, 12) if t > after]
        items = [SimpleNamespace(id=t, data={"text": "t"}, annotations=[annotation]) for t in left[:page_size]]
        return SimpleNamespace(items=items, response=SimpleNamespace(total=len(left)))

    source = LabelStudioSource.__new__(LabelStudioSource)
    source.url, source.include = "http://x", "id,data"
    source.client = SimpleNamespace(tasks=SimpleNamespace(list=listing))
    tasks = list(source.tasks(3, page_size=1))
    assert [t[0] for t in tasks] == [11, 12] and source.complete
    assert calls == [(0, "id,data"), (0, None), (11, None)]  # the last page said it was the last


def test_a_listing_that_ignores_the_id_filter_is_an_error_not_an_endless_loop():
    def listing(*, project, fields, include, page, page_size, query):
        items = [SimpleNamespace(id=11, data={}, annotations=[])]
        return SimpleNamespace(items=items, response=SimpleNamespace(total=None))

    source = LabelStudioSource.__new__(LabelStudioSource)
    source.url, source.include = "http://x", None
    source.client = SimpleNamespace(tasks=SimpleNamespace(list=listing))
    with pytest.raises(SyncError, match="without the id filter"):
        list(source.tasks(3))


class CappedLabelStudio(LabelStudioSource):
    """The real listing loop over a client whose pages hold at most ``cap`` tasks, as Label
    Studio answers under its ``TASK_API_PAGE_SIZE_MAX`` setting; ``claimed`` is added to the
    ``total`` it reports (more than it lists: tasks deleted while the listing ran);
    ``between_pages`` runs before each page after the first (a user deleting tasks)."""

    def __init__(self, tasks: dict[int, list[dict]], cap: int, claimed: int = 0, between_pages=None):
        self.url, self.include, self.complete = "http://label-studio.test", None, False
        self.tasks_by_id = tasks
        self.pages = 0

        def listing(*, project, fields, include, page, page_size, query):
            if self.pages and between_pages:
                between_pages(self.tasks_by_id)
            self.pages += 1
            left = sorted(t for t in self.tasks_by_id if t > after_of(query))
            chunk = left[: min(page_size, cap)]
            items = [SimpleNamespace(id=t, data={"text": f"text of {t}"}, annotations=self.tasks_by_id[t]) for t in chunk]
            return SimpleNamespace(items=items, response=SimpleNamespace(total=len(left) + claimed))

        def get(*, id):
            if any(a["id"] == id for annotations in self.tasks_by_id.values() for a in annotations):
                return {"id": id}
            from label_studio_sdk.core.api_error import ApiError

            raise ApiError(status_code=404, body="not found")

        self.client = SimpleNamespace(tasks=SimpleNamespace(list=listing), annotations=SimpleNamespace(get=get))

    def project(self, ls_id: int) -> ProjectInfo:
        total = sum(len(a) for a in self.tasks_by_id.values())
        return ProjectInfo.from_payload({**project(ls_id), "total_annotations_number": total})


def test_capped_pages_are_read_to_the_total_and_delete_nothing(store):
    events = [annotation_event(i, 1000 + i, choices("World")) for i in range(1, 251)]
    for event in events:
        store.record_event(event)
    studio = CappedLabelStudio({1000 + i: [api_annotation(i, 1000 + i, "World")] for i in range(1, 251)}, cap=100)
    report = sync_project(store, SETTINGS, KEY, source=studio)
    assert report.tasks == 250 and report.deleted == 0 and studio.complete
    assert len(store.annotation_ids(KEY)) == 250


def test_a_listing_short_of_the_total_never_proves_annotations_gone(store):
    for i in range(1, 151):
        store.record_event(annotation_event(i, 1000 + i, choices("World")))
    # Label Studio lists 20 of the tasks but reports 150: 130 candidates, more than are confirmed singly
    studio = CappedLabelStudio({1000 + i: [api_annotation(i, 1000 + i, "World")] for i in range(1, 21)}, cap=100,
                               claimed=130)
    report = sync_project(store, SETTINGS, KEY, source=studio)
    assert not studio.complete and report.deleted == 0
    assert len(store.annotation_ids(KEY)) == 150


def test_tasks_deleted_while_the_sync_lists_cost_no_annotation_label_studio_still_holds(store):
    """A user clears a project in chunks while a sync runs: 150 tasks not read yet go before the
    listing's second page, 100 more during the listing that confirms the candidates.  Only the
    deleted tasks' annotations may go; with pages by offset, the shifted pages skipped live tasks
    and their annotations were deleted and tombstoned for good."""
    tasks = {1000 + i: [api_annotation(i, 1000 + i, "World")] for i in range(1, 401)}
    for i in range(1, 401):
        store.record_event(annotation_event(i, 1000 + i, choices("World")))
    chunks = {1: range(1101, 1251), 4: range(1251, 1351)}  # before the 2nd page; before the 2nd listing's 2nd

    def clear(by_id):
        for task in chunks.get(studio.pages, ()):
            by_id.pop(task, None)

    studio = CappedLabelStudio(tasks, cap=100, between_pages=clear)
    report = sync_project(store, SETTINGS, KEY, source=studio)
    still_held = {a["id"] for annotations in studio.tasks_by_id.values() for a in annotations}
    assert still_held <= store.annotation_ids(KEY), sorted(still_held - store.annotation_ids(KEY))[:5]
    assert studio.pages == 5  # 3 pages, then a second listing (2 pages) confirms the 150 candidates
    assert report.deleted == 150 and store.annotation_ids(KEY) == still_held | set(range(251, 351))
    assert sync_project(store, SETTINGS, KEY, source=studio).deleted == 100  # the 100 read before they went


def test_a_timeout_while_confirming_a_deletion_is_a_sync_error():
    source = LabelStudioSource.__new__(LabelStudioSource)
    source.url = "http://x"

    def get(*, id):
        raise TimeoutError("timed out")

    source.client = SimpleNamespace(annotations=SimpleNamespace(get=get))
    with pytest.raises(SyncError, match="annotation 7: TimeoutError"):
        source.annotation_gone(7)


def test_setup_finds_the_store_behind_and_syncs_in_the_background(store, monkeypatch):
    from ls_backend import sync as sync_module

    studio = FakeLabelStudio({10 + i: [api_annotation(i, 10 + i, "World")] for i in range(1, 6)})
    monkeypatch.setattr(sync_module, "source_for", lambda settings, store_, key: studio)
    scheduler = sync_module.SyncScheduler(Settings(sync_check_interval=300), lambda: store)
    store.note_setup(KEY, None, "http://label-studio.test", "token")
    scheduler.on_setup(KEY)
    assert scheduler.wait_idle(30)
    assert store.stored_annotations(KEY) == 5
    assert store.project_summary(KEY).last_sync["reason"] == "behind Label Studio"
    scheduler.on_setup(KEY)  # within SYNC_CHECK_INTERVAL: no second check
    assert scheduler.wait_idle(5) and scheduler.last_reports[KEY].inserted == 5


def test_start_training_syncs_and_a_count_mismatch_is_checked_later(store, monkeypatch):
    from ls_backend import sync as sync_module

    studio = FakeLabelStudio({10: [api_annotation(1, 10, "World")], 11: [api_annotation(2, 11, "Sports")]})
    monkeypatch.setattr(sync_module, "source_for", lambda settings, store_, key: studio)
    monkeypatch.setattr(sync_module, "CHECK_DELAY_S", 0.05)
    scheduler = sync_module.SyncScheduler(Settings(), lambda: store)
    level = store.record_event(annotation_event(1, 10, choices("World"), proj={**project(), "total_annotations_number": 1}))
    scheduler.on_event(level)
    assert not level.behind and scheduler.wait_idle(5) and KEY not in scheduler.last_reports
    behind = store.record_event({"action": "PROJECT_UPDATED", "project": {**project(), "total_annotations_number": 2}})
    assert behind.behind
    scheduler.on_event(behind)
    assert scheduler.wait_idle(10) and scheduler.last_reports[KEY].inserted == 1
    trigger = store.record_event({"action": "START_TRAINING", "project": project()})
    scheduler.on_event(trigger)
    assert scheduler.wait_idle(10) and scheduler.last_reports[KEY].reason == "START_TRAINING"


def test_status_command_prints_the_operator_view(tmp_path, monkeypatch, capsys):
    from ls_backend.cli import main

    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "cli-models"))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    local = CorrectionStore.from_settings(Settings(model_dir=tmp_path / "cli-models"))
    local.record_event(annotation_event(1, 10, choices("World")))
    local.close()
    assert main(["status"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [p["key"] for p in listing["projects"]] == [KEY]
    assert main(["status", "--project", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["labels"]["topic"]["World"] == 1
    assert main(["status", "--project", "4"]) == 1


def test_labels_a_sync_brings_in_queue_training_as_labels_from_webhooks_do(tmp_path, monkeypatch):
    """Webhooks lost while the backend was down, caught up by a sync: the labels counted towards
    TRAIN_EVERY, and no job was queued until the next annotation came (never, once labeling was done)."""
    from ls_backend.api import create_app

    settings = Settings(model_dir=tmp_path / "models", train_every=3, train_mode="frozen")
    app = create_app(settings, preload=False)
    services = app.extensions["ls_backend"]
    client = app.test_client()
    key = key_of(3)
    assert client.post("/webhook", json=annotation_event(1, 10, choices("World"))).status_code == 200
    assert services.queue.jobs(key) == []
    studio = FakeLabelStudio({10: [api_annotation(1, 10, "World")],
                              **{t: [api_annotation(t - 9, t, "Sports")] for t in range(11, 16)}})
    services.sync._sync(key, "behind Label Studio", source=studio)
    assert services.store.labels_since_training(key) == 6
    jobs = services.queue.jobs(key)
    assert [job.trigger for job in jobs] == ["labels"], jobs
    # a sync that changes nothing queues nothing more
    services.sync._sync(key, "behind Label Studio", source=studio)
    assert len(services.queue.jobs(key)) == 1


def test_a_start_training_job_waits_for_the_sync_a_web_worker_runs_and_takes_its_result(store, monkeypatch):
    """The button queues a job and starts a sync in a web worker; the job's own sync listed Label
    Studio a second time, at the same moment, outside the project's sync lease."""
    import threading
    import time

    from ls_backend import jobs
    from ls_backend import sync as sync_module

    studio = FakeLabelStudio({10: [api_annotation(1, 10, "World")], 11: [api_annotation(2, 11, "Sports")]})
    listings = []
    listed = studio.tasks

    def counted(*args, **kwargs):
        listings.append(time.monotonic())
        return listed(*args, **kwargs)

    studio.tasks = counted
    monkeypatch.setattr(sync_module, "source_for", lambda settings, store_, key: studio)
    store.record_event(annotation_event(1, 10, choices("World")))
    assert store.claim_sync(KEY, 60)  # the web worker's sync, under way

    def web_worker_sync():
        time.sleep(0.5)
        sync_project(store, Settings(), KEY, reason="START_TRAINING")
        store.finish_sync(KEY)

    worker = threading.Thread(target=web_worker_sync)
    worker.start()
    jobs._sync_before_training(Settings(), store, KEY)
    worker.join(30)
    assert len(listings) == 1  # Label Studio listed once, not twice
    assert store.stored_annotations(KEY) == 2 and store.last_sync(KEY)["reason"] == "START_TRAINING"
    assert store.claim_sync(KEY, 60)  # and the job let the lease go
    store.finish_sync(KEY)
    # with no sync of another process to wait for, the job lists Label Studio itself
    jobs._sync_before_training(Settings(), store, KEY)
    assert len(listings) == 2 and store.claim_sync(KEY, 60)


def _speaks_for(store, task_id: int) -> tuple:
    from ls_backend.labeling import plan_for
    from tests.support.events import TOPIC_CONFIG

    topic = plan_for(TOPIC_CONFIG).control("topic")
    (example,) = [e for e in store.training_examples(KEY, topic) if e.task_id == task_id]
    return example.labels


def test_a_ground_truth_moved_to_another_annotation_clears_the_old_flag_as_label_studio_does(store):
    """Label Studio keeps one ground truth per task: marking a second one clears the first one's flag
    with a plain update (no webhook, no new updated_at). The store kept the first flagged, so once
    the second was unmarked, the first spoke for the task again, over two votes to one."""
    for annotation_id, label, who in ((1, "World", 1), (2, "Sports", 2), (3, "Sports", 3)):
        store.record_event(annotation_event(annotation_id, 10, choices(label), annotator=who))
    store.record_event(annotation_event(1, 10, choices("World"), annotator=1, updated=10, ground_truth=True,
                                        action="ANNOTATION_UPDATED"))
    assert _speaks_for(store, 10) == ("World",)
    store.record_event(annotation_event(2, 10, choices("Sports"), annotator=2, updated=20, ground_truth=True,
                                        action="ANNOTATION_UPDATED"))
    store.record_event(annotation_event(2, 10, choices("Sports"), annotator=2, updated=30,
                                        action="ANNOTATION_UPDATED"))  # unmarked: no ground truth at all
    assert _speaks_for(store, 10) == ("Sports",)
    # what Label Studio lists now is what the store holds: a sync changes nothing
    studio = FakeLabelStudio({10: [api_annotation(1, 10, "World", updated=10), api_annotation(2, 10, "Sports", updated=30),
                                   api_annotation(3, 10, "Sports")]})
    for annotation in studio.all():
        annotation["completed_by"] = annotation["id"]
    report = sync_project(store, SETTINGS, KEY, source=studio)
    assert (report.updated, report.unchanged) == (0, 3)


def test_a_sync_takes_what_label_studio_changed_without_a_new_stamp(store):
    """The flag cleared by Label Studio's plain update reaches the store only by a sync, at the
    stamp the store holds already: the conflict rule broke that tie by content hash, and kept the
    stale flag about half the time."""
    for annotation_id, label, who in ((1, "World", 1), (2, "Sports", 2), (3, "Sports", 3)):
        store.record_event(annotation_event(annotation_id, 10, choices(label), annotator=who))
    for gt, updated in ((True, 10), (False, 20)):  # either way round the two hashes sort
        store.record_event(annotation_event(1, 10, choices("World"), annotator=1, updated=updated, ground_truth=gt,
                                            action="ANNOTATION_UPDATED"))
        flagged = annotation_event(1, 10, choices("World"), annotator=1, updated=updated, ground_truth=not gt)
        studio = FakeLabelStudio({10: [flagged["annotation"], api_annotation(2, 10, "Sports"), api_annotation(3, 10, "Sports")]})
        for annotation in studio.all()[1:]:
            annotation["completed_by"] = annotation["id"]
        report = sync_project(store, SETTINGS, KEY, source=studio)
        assert report.updated == 1
        assert _speaks_for(store, 10) == (("World",) if not gt else ("Sports",))


def test_the_same_label_on_edited_task_text_counts_towards_the_next_training(store):
    """The text a label is on changed (edited in Label Studio, then the label saved again, or read by
    a sync): the store took the new text, but counted nothing, so no training was ever queued for it."""
    store.record_event(annotation_event(1, 10, choices("World"), text="old text"))
    store.mark_trained(KEY, store.current_seq(KEY))
    assert store.labels_since_training(KEY) == 0
    store.record_event(annotation_event(1, 10, choices("World"), updated=5, text="new text", action="ANNOTATION_UPDATED"))
    assert store.labels_since_training(KEY) == 1
    store.mark_trained(KEY, store.current_seq(KEY))
    studio = FakeLabelStudio({10: [api_annotation(1, 10, "World", updated=5)]})  # its text: "text of 10"
    sync_project(store, SETTINGS, KEY, source=studio)
    assert store.labels_since_training(KEY) == 1
    store.record_event(annotation_event(1, 10, choices("World"), updated=5, action="ANNOTATION_UPDATED"))  # a replay
    assert store.labels_since_training(KEY) == 1


def test_a_sync_keeps_each_ground_truth_flag_as_label_studio_lists_it(store):
    """Two annotations flagged ground truth on one task (as an import can leave them): the sync's
    listing is how things stand, so it clears neither (clearing one, it read it back at the next
    sync and cleared the other: each sync counted a change and queued training)."""
    flagged = [annotation_event(i, 10, choices(label), annotator=i, ground_truth=True)["annotation"]
               for i, label in ((1, "World"), (2, "Sports"))]
    studio = FakeLabelStudio({10: flagged})
    assert sync_project(store, SETTINGS, KEY, source=studio).inserted == 2
    for _ in range(2):
        report = sync_project(store, SETTINGS, KEY, source=studio)
        assert (report.updated, report.unchanged) == (0, 2)
