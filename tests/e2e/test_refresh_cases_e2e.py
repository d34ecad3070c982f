"""The refresh's own cases against a real Label Studio 1.23: the bound, unreadable tasks, pages and the
pool, a re-created project, whose ``model_version`` to follow, and the cold start.

``test_refresh_e2e.py`` drives the whole loop (jobs, promotion, an interrupted refresh resumed, Label
Studio's ordering); here each case calls ``PredictionRefresh`` directly on a project of its own.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from ls_backend.predictor import Predictor
from ls_backend.refresh import PredictionRefresh, RefreshError
from ls_backend.registry import ModelRegistry
from ls_backend.sampling import PoolStore, next_batch
from ls_backend.settings import Settings
from ls_backend.store import CorrectionStore
from ls_backend.sync import sync_project
from tests.support.events import NER_CONFIG, TOPIC_CONFIG, choices, project_key

pytestmark = pytest.mark.e2e

TEXTS = [
    "Stocks fell as oil prices rose", "The striker scored twice in the final", "Intel unveils a faster chip",
    "Rebels seize a town in the north", "The central bank holds rates", "NASA probe reaches Mars orbit",
    "Coach sacked after the defeat", "Parliament passes the budget", "A new phone from Apple",
    "Oil company posts record profit", "Tennis star wins the open", "Scientists map the genome",
]




def new_project(ls, title: str, tmp_path, page_size: int, config: str = TOPIC_CONFIG):
    """A Label Studio project of the 12 texts, and the settings, registry and store of a backend for it."""
    created = ls.create_project(title, config)
    task_ids = ls.import_tasks(created["id"], [{"text": t} for t in TEXTS])
    settings = Settings(model_dir=tmp_path / "models", max_length=128, label_studio_url=ls.url,
                        label_studio_api_key=ls.token, refresh_page_size=page_size, sync_check_interval=0)
    registry = ModelRegistry(settings.model_dir)
    return created, project_key(created), task_ids, settings, registry, CorrectionStore.from_settings(settings)


@pytest.fixture
def project(label_studio, tmp_path, encoder):
    """A project known to the store, whose current version is a trained copy of its cold start
    (``p<id>-v1``, as a promotion leaves it); yields what a refresh needs."""
    ls = label_studio
    created, key, task_ids, settings, registry, store = new_project(ls, "refresh cases (e2e)", tmp_path, 4)
    sync_project(store, settings, key)
    predictor = Predictor(settings, registry, encoder=encoder)
    v0 = predictor.setup(key, TOPIC_CONFIG)
    cold = registry.load(key, v0)
    heads = {name: replace(head, trained=True) for name, head in cold.heads.items()}
    version = registry.create_version(key, heads, dict(cold.meta, kind="fine-tune", parent=v0))
    registry.promote(key, version)
    try:
        yield {"ls": ls, "id": created["id"], "key": key, "tasks": task_ids, "settings": settings,
               "registry": registry, "store": store, "version": version}
    finally:
        store.close()


def refresh(p, encoder, settings=None, key=None):
    return PredictionRefresh(settings or p["settings"], p["store"], p["registry"], encoder=encoder).run(key or p["key"])


def test_labeled_skipped_and_unreadable_tasks_get_nothing_and_the_pool_keeps_the_rest(project, encoder):
    p, ls = project, project["ls"]
    labeled, skipped = p["tasks"][0], p["tasks"][3]
    ls.create_annotation(labeled, choices("Business"))
    ls.create_annotation(skipped, [], was_cancelled=True)
    blank = ls.import_tasks(p["id"], [{"text": "   "}])[0]  # no readable text: no prediction
    report = refresh(p, encoder)
    unlabeled = [t for t in p["tasks"] if t not in (labeled, skipped)] + [blank]
    written = ls.versions_by_task(p["id"])
    assert set(written) == set(unlabeled) - {blank}, written
    assert all(counts == Counter({p["version"]: 1}) for counts in written.values()), written
    assert report.state == "finished" and report.written == len(unlabeled) - 1 and report.unreadable == 1
    assert report.tasks == len(unlabeled) and report.pages == 3  # pages of 4
    for prediction in ls.predictions(p["id"]):
        assert 0 <= prediction["score"] <= 1 and prediction["result"][0]["from_name"] == "topic"
    pool = PoolStore(p["registry"]).load(p["key"], p["version"])
    assert pool.complete and pool.trained and sorted(pool.task_ids) == sorted(written)
    assert pool.embeddings.shape == (len(written), encoder.dim) and pool.probabilities.shape == (len(written), 4)
    assert np.allclose(np.linalg.norm(pool.embeddings, axis=1), 1, atol=1e-2)
    text_of = {t["id"]: t["data"]["text"] for t in ls.tasks(p["id"])}
    assert pool.texts == [text_of[t] for t in pool.task_ids]  # in task id order, as Label Studio serves them
    again = refresh(p, encoder)  # the same version again: a top-up, and nothing new to write
    last = max(p["tasks"] + [blank])
    assert again.top_up_after == last and again.tasks == again.written == 0
    assert len(ls.predictions(p["id"])) == len(written)
    batch = next_batch(p["settings"], p["registry"], p["store"], p["key"], 3)
    assert batch.strategy == "uncertainty" and len(batch.task_ids) == 3 and not batch.stale
    assert set(batch.task_ids) <= set(written)
    # tasks imported after the refresh: the next one for the same version predicts them alone
    new = ls.import_tasks(p["id"], [{"text": "Markets rally on the news"}, {"text": "A late goal wins the cup"}])
    topped = refresh(p, encoder)
    assert topped.top_up_after == last and topped.written == 2 and topped.tasks == 2
    assert ls.versions_by_task(p["id"]).keys() == set(written) | set(new)
    assert all(counts == Counter({p["version"]: 1}) for counts in ls.versions_by_task(p["id"]).values())
    pool = PoolStore(p["registry"]).load(p["key"], p["version"])
    assert pool.complete and sorted(pool.task_ids) == sorted(set(written) | set(new))


def test_a_top_up_predicts_tasks_unlabeled_again_below_where_the_refresh_had_gone(project, encoder):
    """A task labeled when the refresh ran, whose annotation (or skip) is deleted afterwards, lies
    below the refresh's cursor: a top-up that only read ids above it never predicted it, and /next
    stayed empty while it waited unlabeled in Label Studio."""
    p, ls = project, project["ls"]
    first, second = sorted(p["tasks"])[1], sorted(p["tasks"])[2]
    labeled = ls.create_annotation(first, choices("Business"))
    skipped = ls.create_annotation(second, [], was_cancelled=True)
    blank = ls.import_tasks(p["id"], [{"text": "   "}])[0]  # unreadable: no prediction, then or in a top-up
    report = refresh(p, encoder)
    assert report.written == len(TEXTS) - 2 and report.unreadable == 1
    ls.delete_annotation(labeled["id"])
    ls.delete_annotation(skipped["id"])
    topped = refresh(p, encoder)
    assert topped.top_up_after == blank and topped.returned == 2 and topped.written == 2, topped
    assert topped.unreadable == 0  # the blank task is not read again for the same version
    written = ls.versions_by_task(p["id"])
    assert set(written) == set(p["tasks"]) and all(c == Counter({p["version"]: 1}) for c in written.values())
    pool = PoolStore(p["registry"]).load(p["key"], p["version"])
    assert sorted(pool.task_ids) == sorted(p["tasks"]) and len(pool.task_ids) == len(set(pool.task_ids.tolist()))
    again = refresh(p, encoder)  # nothing new: nothing read twice, nothing written
    assert again.returned == again.written == again.tasks == 0, again


def test_a_top_up_predicts_new_tasks_under_the_ids_of_deleted_ones(project, encoder):
    """Label Studio on SQLite numbers imported tasks from the newest one there: tasks deleted and
    imported again come back under the same ids. A top-up took them for the pool's tasks: no
    prediction, and /next ranked them by the deleted tasks' texts."""
    p, ls = project, project["ls"]
    refresh(p, encoder)
    last = sorted(p["tasks"])[-2:]
    ls.request("POST", f"/api/dm/actions?id=delete_tasks&project={p['id']}",
               json={"selectedItems": {"all": False, "included": last}})
    again = ls.import_tasks(p["id"], [{"text": "The goalkeeper saved a penalty"}, {"text": "A chip maker cuts jobs"}])
    assert again == last  # the ids given again
    topped = refresh(p, encoder)
    assert topped.returned == 2 and topped.written == 2, topped
    assert all(ls.versions_by_task(p["id"])[t] == Counter({p["version"]: 1}) for t in last)
    pool = PoolStore(p["registry"]).load(p["key"], p["version"])
    texts = dict(zip(pool.task_ids.tolist(), pool.texts))
    assert [texts[t] for t in last] == ["The goalkeeper saved a penalty", "A chip maker cuts jobs"]
    assert refresh(p, encoder).returned == 0  # read once


def test_a_task_deleted_while_its_page_is_predicted_costs_only_its_own_prediction(project, encoder, monkeypatch):
    """Label Studio refuses a whole import (400) for one task deleted since its page was listed: the
    refresh failed there, and no task after it got a prediction."""
    from ls_backend.refresh import LabelStudioPredictions

    p, ls = project, project["ls"]
    doomed = sorted(p["tasks"])[5]  # on the second page of 4
    listed = LabelStudioPredictions.unlabeled_after

    def listing_then_delete(self, after_id, size, up_to=None):
        tasks, left = listed(self, after_id, size, up_to)
        if any(t["id"] == doomed for t in tasks):
            ls.request("DELETE", f"/api/tasks/{doomed}")
        return tasks, left

    monkeypatch.setattr(LabelStudioPredictions, "unlabeled_after", listing_then_delete)
    imports = []
    create = LabelStudioPredictions.create

    def counted(self, rows):
        imports.append(len(rows))
        return create(self, rows)

    monkeypatch.setattr(LabelStudioPredictions, "create", counted)
    report = refresh(p, encoder)
    assert report.state == "finished" and report.gone == 1 and report.written == len(TEXTS) - 1, report
    # the refused page's other rows go again in one import, not one each (every import call makes
    # Label Studio recount every task of the project)
    assert imports == [4, 4, 3, 4], imports
    assert set(ls.versions_by_task(p["id"])) == set(p["tasks"]) - {doomed}
    assert doomed not in PoolStore(p["registry"]).load(p["key"], p["version"]).task_ids
    # a page of one task, deleted as well: gone, not a failed refresh (nothing else to tell it by)
    doomed = ls.import_tasks(p["id"], [{"text": "Markets rally on the news"}])[0]
    topped = refresh(p, encoder)
    assert topped.state == "finished" and topped.gone == 1 and topped.written == 0, topped
    # and a refusal of a task Label Studio still lists is the rows' fault: raised
    monkeypatch.setattr(LabelStudioPredictions, "unlabeled_after", listed)
    kept = ls.import_tasks(p["id"], [{"text": "A late goal wins the cup"}])[0]

    def refusing(self, rows):
        raise RefreshError("Label Studio: HTTP 400: a malformed prediction", 400)

    monkeypatch.setattr(LabelStudioPredictions, "create", refusing)
    with pytest.raises(RefreshError, match="malformed"):
        refresh(p, encoder)
    assert kept not in ls.versions_by_task(p["id"])


def test_bounded_by_refresh_max_tasks(project, encoder):
    p = project
    report = refresh(p, encoder, settings=replace(p["settings"], refresh_max_tasks=5))
    assert report.written == 5 and report.bounded
    assert sorted(p["ls"].versions_by_task(p["id"])) == sorted(p["tasks"])[:5]  # the lowest task ids first


def test_after_a_label_config_change_the_refresh_writes_the_version_setup_answers_for_it(project, encoder):
    """The control renamed in Label Studio after the version was made: the refresh wrote predictions
    naming the old control under the old version; Label Studio dropped every one (answering 201), and
    the refresh reported them written."""
    p = project
    renamed = TOPIC_CONFIG.replace('name="topic"', 'name="category"')
    p["ls"].request("PATCH", f"/api/projects/{p['id']}", json={"label_config": renamed})
    report = refresh(p, encoder)
    answered = Predictor(p["settings"], p["registry"], encoder=encoder).setup(p["key"], renamed)
    assert report.version == answered != p["version"], report
    assert p["registry"].meta(p["key"], answered)["kind"] == "config-change"
    assert report.written == len(TEXTS)
    assert p["ls"].versions_by_task(p["id"]) == {t: Counter({answered: 1}) for t in p["tasks"]}
    assert {r["from_name"] for pred in p["ls"].predictions(p["id"]) for r in pred["result"]} == {"category"}


def test_a_task_whose_probabilities_are_not_finite_does_not_stop_the_refresh(project, encoder, monkeypatch):
    """A half-precision overflow gives one task of each page a row of NaN: the refresh still
    finishes (it stopped at that page on every try, and /next stayed stale), that task gets no
    prediction, and the pool keeps it (/next ranks such a row first: test_sampling)."""
    from ls_backend import model

    p = project
    probabilities = model.ClassifierHead.probabilities

    def overflowing(self, embeddings):  # (a bf16 overflow cannot be made to happen here at will)
        out = np.array(probabilities(self, embeddings), dtype=np.float32)
        out[0] = np.nan  # the first task of each page of 4
        return out

    monkeypatch.setattr(model.ClassifierHead, "probabilities", overflowing)
    report = refresh(p, encoder)
    assert report.state == "finished" and report.tasks == 12, report
    overflowed = sorted(p["tasks"])[::4]
    assert set(p["ls"].versions_by_task(p["id"])) == set(p["tasks"]) - set(overflowed)
    pool = PoolStore(p["registry"]).load(p["key"], p["version"])
    assert pool.complete and sorted(pool.task_ids) == sorted(p["tasks"])
    assert not np.isfinite(pool.probabilities[np.isin(pool.task_ids, overflowed)]).any()


def test_a_short_batch_from_a_bounded_refresh_queues_a_top_up_and_a_resumed_refresh_stays_bounded(
        project, encoder, monkeypatch):
    """REFRESH_MAX_TASKS=8 of 12 unlabeled tasks: a refresh killed after its last page, resumed,
    still says it stopped at the bound; once most of the pool is labeled, /next answers the few
    left and queues a top-up (it waited until none was left)."""
    from ls_backend.api import create_app

    p = project
    settings = replace(p["settings"], refresh_max_tasks=8)
    killed = PredictionRefresh(settings, p["store"], p["registry"], encoder=encoder)
    monkeypatch.setattr(killed, "_labeled_part", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):  # killed after its last page, before it said it had finished
        killed.run(p["key"])
    report = refresh(p, encoder, settings=settings)
    assert report.state == "finished" and report.tasks == 8 and report.bounded, report
    pooled = sorted(p["tasks"])[:8]
    for task in pooled[:6]:  # 6 of the 8 pooled tasks labeled since
        p["ls"].create_annotation(task, choices("Sports"))
    sync_project(p["store"], settings, p["key"])
    client = create_app(settings, Predictor(settings, p["registry"], encoder=encoder)).test_client()
    answer = client.get(f"/projects/{p['key']}/next?n=5&strategy=random")
    assert answer.status_code == 200 and sorted(answer.json["task_ids"]) == pooled[6:], answer.json
    assert answer.json.get("refresh_job"), answer.json  # 4 more unlabeled tasks wait in Label Studio
    enough = client.get(f"/projects/{p['key']}/next?n=2&strategy=random")
    assert "refresh_job" not in enough.json  # as many as asked for: nothing to top up


def test_a_re_created_project_is_refused(project, encoder):
    p = project
    stale_key = f"{p['id']}.{int(p['key'].split('.')[1]) - 3600}"  # same id, created an hour earlier
    with pytest.raises(RefreshError, match="re-created"):
        refresh(p, encoder, key=stale_key)
    assert p["ls"].predictions(p["id"]) == []


def test_label_studios_model_version_follows_ours_but_not_another_models(project, encoder):
    """Label Studio orders tasks by the predictions of the project's ``model_version``. A refresh moves it to
    the new version when it names one of ours, and leaves it when the user chose another model's."""
    p, ls, registry = project, project["ls"], project["registry"]

    def promote_newer(parent: str) -> str:
        loaded = registry.load(p["key"], parent)
        newer = registry.create_version(p["key"], loaded.heads, dict(loaded.meta, parent=parent))
        registry.promote(p["key"], newer)
        return newer

    first = refresh(p, encoder)
    assert first.written == len(TEXTS) and not first.followed  # the project named no version yet
    v1 = p["version"]
    ls.request("PATCH", f"/api/projects/{p['id']}", json={"model_version": v1})  # the user picks ours
    v2 = promote_newer(v1)
    second = refresh(p, encoder)
    assert second.followed and ls.project(p["id"])["model_version"] == v2
    # predictions of another model, imported by the user, chosen for ordering
    result = [{"from_name": "topic", "to_name": "text", "type": "choices", "value": {"choices": ["World"]}}]
    for task_id in p["tasks"]:
        ls.request("POST", "/api/predictions", json={"task": task_id, "result": result, "score": 0.5,
                                                     "model_version": "their-model"})
    ls.request("PATCH", f"/api/projects/{p['id']}", json={"model_version": "their-model"})
    v3 = promote_newer(v2)
    third = refresh(p, encoder)
    assert third.written == len(TEXTS) and not third.followed
    assert ls.project(p["id"])["model_version"] == "their-model"
    assert ls.versions_by_task(p["id"]) == {t: Counter({v1: 1, v2: 1, v3: 1, "their-model": 1}) for t in p["tasks"]}
    assert [path.name for path in PoolStore(registry).root(p["key"]).iterdir()] == [v3]  # older pools dropped


def chosen_then_superseded(p, encoder) -> tuple[str, str]:
    """The project's version v1 refreshed and chosen in Label Studio, then a copy v2 promoted over it."""
    registry, v1 = p["registry"], p["version"]
    refresh(p, encoder)
    p["ls"].request("PATCH", f"/api/projects/{p['id']}", json={"model_version": v1})
    loaded = registry.load(p["key"], v1)
    v2 = registry.create_version(p["key"], loaded.heads, dict(loaded.meta, parent=v1))
    registry.promote(p["key"], v2)
    return v1, v2


def test_label_studios_model_version_follows_at_the_next_job_when_it_could_not_be_moved(project, encoder,
                                                                                        monkeypatch):
    """Label Studio failing the PATCH that moves its model_version once left it on the older version
    until the next promotion: the refresh had finished, and its top-ups wrote nothing new."""
    from ls_backend.refresh import LabelStudioPredictions, RefreshError, unfinished_refresh

    p, ls = project, project["ls"]
    v1, v2 = chosen_then_superseded(p, encoder)
    moved = LabelStudioPredictions.set_model_version

    def failing(self, version):
        raise RefreshError("Label Studio: HTTP 502", 502)

    monkeypatch.setattr(LabelStudioPredictions, "set_model_version", failing)
    report = refresh(p, encoder)
    assert report.written == len(TEXTS) and not report.followed and ls.project(p["id"])["model_version"] == v1
    assert unfinished_refresh(p["settings"], p["key"]) == v2  # the next job of the project runs a top-up
    monkeypatch.setattr(LabelStudioPredictions, "set_model_version", moved)
    topped = refresh(p, encoder)
    assert topped.top_up_after is not None and topped.written == 0 and topped.followed, topped
    assert ls.project(p["id"])["model_version"] == v2
    assert unfinished_refresh(p["settings"], p["key"]) is None


def test_a_rollback_while_a_refresh_runs_is_not_undone_in_label_studio(project, encoder, monkeypatch):
    """A rollback (or a pin) takes the registry's lock, not the refresh's: the refresh of the version
    rolled away from went on, then moved Label Studio's model_version to it and dropped the pool of
    the version serving now; the rollback queued no refresh of its own."""
    p, ls, registry = project, project["ls"], project["registry"]
    v1, v2 = chosen_then_superseded(p, encoder)
    pages = []
    page = PredictionRefresh._page

    def rolled_back_after_the_first_page(self, *args, **kwargs):
        written = page(self, *args, **kwargs)
        if not pages:
            registry.rollback(p["key"], v1)
        pages.append(written)
        return written

    monkeypatch.setattr(PredictionRefresh, "_page", rolled_back_after_the_first_page)
    report = refresh(p, encoder)
    assert ls.project(p["id"])["model_version"] == v1  # not moved to the version rolled away from
    assert sorted(path.name for path in PoolStore(registry).root(p["key"]).iterdir()) == sorted([v1, v2])
    # and it stopped there: the pages left are the refresh of the version serving now to write
    assert len(pages) == 1 and report.version == v2 and report.superseded_by == v1 and not report.followed
    assert sum(v2 in versions for versions in ls.versions_by_task(p["id"]).values()) == 4
    batch = next_batch(p["settings"], registry, p["store"], p["key"], 3)
    assert batch.pool_version == v1 and not batch.stale, batch  # the serving version's pool is still there


def test_versions_another_install_left_in_label_studio_are_not_taken_for_ours(project, encoder):
    """A backend whose MODEL_DIR was lost (a container recreated without its volume) names versions
    from v0 again: Label Studio's predictions of the old p<id>-v1 were taken for the new v1's
    ("already there"), and it went on showing the old model's suggestions and scores."""
    p, ls, registry = project, project["ls"], project["registry"]
    prefix = f"p{p['id']}"
    result = [{"from_name": "topic", "to_name": "text", "type": "choices", "value": {"choices": ["World"]}}]
    for task_id in p["tasks"]:
        for old in (1, 2, 3):
            ls.request("POST", "/api/predictions", json={"task": task_id, "result": result, "score": 0.9,
                                                         "model_version": f"{prefix}-v{old}"})
    ls.request("PATCH", f"/api/projects/{p['id']}", json={"model_version": f"{prefix}-v3"})
    assert p["version"] == f"{prefix}-v1"
    report = refresh(p, encoder)
    served = f"{prefix}-v4"
    assert report.version == served == registry.current(p["key"]) and report.written == len(TEXTS), report
    assert report.followed and ls.project(p["id"])["model_version"] == served
    assert ls.versions_by_task(p["id"]) == {
        t: Counter({f"{prefix}-v1": 1, f"{prefix}-v2": 1, f"{prefix}-v3": 1, served: 1}) for t in p["tasks"]}
    copy = registry.load(p["key"], served)
    assert copy.meta["renumbered_from"] == p["version"]
    assert {n: h.weight.tolist() for n, h in copy.heads.items()} == {
        n: h.weight.tolist() for n, h in registry.load(p["key"], p["version"]).heads.items()}
    again = refresh(p, encoder)  # the names are reserved now: no second copy
    assert again.version == served and again.written == 0 and registry.current(p["key"]) == served
    loaded = registry.load(p["key"], served)
    assert registry.create_version(p["key"], loaded.heads, dict(loaded.meta, parent=served)) == f"{prefix}-v5"


def test_cold_start_refresh_makes_v0_and_the_first_batch_is_chosen_for_coverage(label_studio, tmp_path, encoder):
    ls = label_studio
    # the store has never seen the project (no sync): its label config comes from Label Studio
    created, key, task_ids, settings, registry, store = new_project(ls, "refresh cold start (e2e)", tmp_path, 50)
    try:
        report = PredictionRefresh(settings, store, registry, encoder=encoder).run(key)
        v0 = f"p{created['id']}-v0"
        assert report.version == v0 == registry.current(key) and report.written == len(TEXTS)
        assert ls.versions_by_task(created["id"]) == {t: Counter({v0: 1}) for t in task_ids}
        batch = next_batch(settings, registry, store, key, 4, "uncertainty")
        assert batch.strategy == "coverage" and len(set(batch.task_ids)) == 4 and set(batch.task_ids) <= set(task_ids)
    finally:
        store.close()


TWO_FIELDS = """<View>
  <Text name="title" value="$title"/>
  <Choices name="topic" toName="title"><Choice value="World"/><Choice value="Sports"/></Choices>
  <Text name="body" value="$body"/>
  <Choices name="sentiment" toName="body"><Choice value="Positive"/><Choice value="Negative"/></Choices>
</View>"""


def test_a_task_whose_first_controls_field_is_empty_still_gets_the_other_controls_prediction(label_studio, tmp_path,
                                                                                           encoder):
    """A task whose first control reads an empty field got no prediction at all: its other controls'
    predictions were dropped with it."""
    ls = label_studio
    created = ls.create_project("refresh two fields (e2e)", TWO_FIELDS)
    both, body_only, neither = ls.import_tasks(created["id"], [
        {"title": "Team wins the cup", "body": "A great day for fans"},
        {"title": "", "body": "A terrible, sad defeat"},
        {"title": "", "body": ""},
    ])
    settings = Settings(model_dir=tmp_path / "models", max_length=128, label_studio_url=ls.url,
                        label_studio_api_key=ls.token, refresh_page_size=50, sync_check_interval=0)
    store = CorrectionStore.from_settings(settings)
    try:
        report = PredictionRefresh(settings, store, ModelRegistry(settings.model_dir), encoder=encoder).run(
            project_key(created))
        assert (report.written, report.unreadable) == (2, 1), report
        written = {p["task"]: p for p in ls.predictions(created["id"])}
        assert set(written) == {both, body_only}
        assert sorted(r["from_name"] for r in written[both]["result"]) == ["sentiment", "topic"]
        assert [r["from_name"] for r in written[body_only]["result"]] == ["sentiment"]
        assert written[body_only]["result"][0]["value"]["choices"][0] in ("Positive", "Negative")
        assert 0 < written[body_only]["score"] <= 1
    finally:
        store.close()


def test_a_task_where_a_trained_ner_head_finds_nothing_still_gets_its_prediction_and_score(label_studio, tmp_path,
                                                                                         encoder):
    """An empty result is a prediction too: a text with no entity found has a score (the lowest probability of
    ``O``), which Label Studio orders by and the ``/next`` pool ranks."""
    ls = label_studio
    created, key, task_ids, settings, registry, store = new_project(ls, "refresh ner (e2e)", tmp_path, 50, NER_CONFIG)
    try:
        sync_project(store, settings, key)
        v0 = Predictor(settings, registry, encoder=encoder).setup(key, NER_CONFIG)
        cold = registry.load(key, v0)
        # a "trained" head of zero rows: every tag equally likely, so no span and a real score on every text
        heads = {name: replace(head, trained=True) for name, head in cold.heads.items()}
        version = registry.create_version(key, heads, dict(cold.meta, kind="fine-tune", parent=v0))
        registry.promote(key, version)
        report = PredictionRefresh(settings, store, registry, encoder=encoder).run(key)
        assert report.written == len(TEXTS) and report.unreadable == 0, report
        written = ls.predictions(created["id"])
        assert {p["task"] for p in written} == set(task_ids)
        assert all(p["result"] == [] and 0 < p["score"] < 1 for p in written), written[:2]
        batch = next_batch(settings, registry, store, key, 4, "uncertainty")
        assert batch.pool_size == len(TEXTS) and batch.strategy == "uncertainty"  # by the scores written
    finally:
        store.close()


def test_an_ner_project_before_any_training_gets_a_pool_for_its_first_batch_and_no_empty_predictions(
        label_studio, tmp_path, encoder):
    ls = label_studio
    created, key, task_ids, settings, registry, store = new_project(ls, "refresh ner cold start (e2e)", tmp_path, 50,
                                                                    NER_CONFIG)
    try:
        report = PredictionRefresh(settings, store, registry, encoder=encoder).run(key)
        assert report.written == 0 and report.pooled_only == len(TEXTS) and report.unreadable == 0, report
        assert ls.predictions(created["id"]) == []  # an untrained entity head has nothing to say
        batch = next_batch(settings, registry, store, key, 4, "uncertainty")
        assert batch.strategy == "coverage" and len(set(batch.task_ids)) == 4 and set(batch.task_ids) <= set(task_ids)
    finally:
        store.close()
