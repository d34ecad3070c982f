"""Syncs against a real Label Studio 1.23: one that caps its pages (``TASK_API_PAGE_SIZE_MAX``) has every
page read, and only the annotation deleted in Label Studio deleted here; an annotation id its import gives
again is stored."""

from __future__ import annotations

import pytest

from ls_backend import sync as sync_module
from ls_backend.settings import Settings
from ls_backend.store import CorrectionStore
from ls_backend.sync import sync_project
from tests.support.events import TOPIC_CONFIG, choices, project_key
from tests.support.label_studio import LabelStudio

pytestmark = pytest.mark.e2e


@pytest.fixture
def capped_label_studio(label_studio):
    """A second Label Studio (the session's one proves the install works) answering at most 2 tasks a page."""
    with LabelStudio(extra_env={"TASK_API_PAGE_SIZE_MAX": "2"}) as server:
        yield server


def test_a_sync_reads_every_capped_page_and_deletes_only_what_label_studio_deleted(capped_label_studio, tmp_path,
                                                                                     monkeypatch):
    ls = capped_label_studio
    created = ls.create_project("capped pages (e2e)", TOPIC_CONFIG)
    task_ids = ls.import_tasks(created["id"], [{"text": f"text number {n}"} for n in range(5)])
    annotations = [ls.create_annotation(task, choices("World"))["id"] for task in task_ids]
    settings = Settings(model_dir=tmp_path / "models", label_studio_url=ls.url, label_studio_api_key=ls.token,
                        sync_check_interval=0)
    store = CorrectionStore.from_settings(settings)
    key = project_key(created)
    try:
        first = sync_project(store, settings, key)
        assert (first.tasks, first.inserted, first.deleted) == (5, 5, 0), first
        # every deletion candidate confirmed by a second listing, the path a large project takes
        monkeypatch.setattr(sync_module, "CONFIRM_ONE_BY_ONE", 0)
        ls.delete_annotation(annotations[3])
        second = sync_project(store, settings, key)
        assert (second.tasks, second.deleted) == (5, 1), second
        assert store.annotation_ids(key) == set(annotations) - {annotations[3]}
    finally:
        store.close()


def test_an_annotation_id_label_studio_gives_again_on_import_is_stored(label_studio, tmp_path):
    """Label Studio on SQLite numbers imported annotations from the newest one there: once that one is
    deleted, the next import gives its id again. The store's tombstone refused the new label for good."""
    ls = label_studio
    created = ls.create_project("ids given again (e2e)", TOPIC_CONFIG)

    def import_labeled(texts):
        ls.request("POST", f"/api/projects/{created['id']}/import",
                   json=[{"data": {"text": t}, "annotations": [{"result": choices("World")}]} for t in texts])

    def annotation_ids():
        return {a["id"] for t in ls.tasks(created["id"]) for a in t["annotations"]}

    settings = Settings(model_dir=tmp_path / "models", label_studio_url=ls.url, label_studio_api_key=ls.token,
                        sync_check_interval=0)
    store = CorrectionStore.from_settings(settings)
    key = project_key(created)
    try:
        import_labeled(["one", "two"])
        assert sync_project(store, settings, key).inserted == 2
        newest = max(annotation_ids())
        ls.delete_annotation(newest)
        assert sync_project(store, settings, key).deleted == 1  # a tombstone for it
        import_labeled(["three"])
        assert newest in annotation_ids()  # the id given again, to the imported label
        report = sync_project(store, settings, key)
        assert (report.inserted, report.kept_deleted) == (1, 0), report
        assert store.annotation_ids(key) == annotation_ids()
        assert report.label_studio_annotations == report.stored_annotations == 2
    finally:
        store.close()
