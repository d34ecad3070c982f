"""After a promotion the worker rewrites the predictions of a real Label Studio 1.23's unlabeled tasks.

Label Studio is real (its API, its database, its Data Manager ordering and its uncertainty
sampling); the worker's job function (``jobs.execute_training``) runs in this process, as an rq
worker or the embedded runner would run it.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from ls_backend.finetune import in_eval_slice
from ls_backend.jobs import execute_training
from ls_backend.refresh import PredictionRefresh
from ls_backend.registry import ModelRegistry
from ls_backend.sampling import PoolStore, next_batch
from ls_backend.settings import Settings
from ls_backend.store import CorrectionStore
from ls_backend.sync import sync_project
from tests.support.events import TOPIC_CONFIG, choices, project_key
from tests.support.loop import balanced_agnews

pytestmark = pytest.mark.e2e

PER_LABEL = 7  # 28 tasks
# 16 labeled, 1 skipped, 11 left unlabeled; all 16 train (no evaluation slice), 4 a label: as many
# as the fast head's folds, so its fitted head serves (with fewer, the zero-shot head may win on a
# machine's precision, and /next would choose for coverage)
LABELED_PER_LABEL = 4




def test_refresh_after_promotion_writes_one_prediction_per_unlabeled_task(label_studio, tmp_path, monkeypatch, capsys):
    ls = label_studio
    rows = balanced_agnews(PER_LABEL, split="dev", offset=2000)
    project = ls.create_project("AG News refresh (e2e)", TOPIC_CONFIG)
    project_id, key = project["id"], project_key(project)
    task_ids = ls.import_tasks(project_id, [{"text": text} for _, text, _ in rows])
    gold = dict(zip(task_ids, (label for _, _, label in rows)))
    settings = Settings(
        model_dir=tmp_path / "models", max_length=128, label_studio_url=ls.url, label_studio_api_key=ls.token,
        train_mode="frozen", force_promote=True, refresh_page_size=5, sync_check_interval=0, eval_share=0.0,
    )
    registry = ModelRegistry(settings.model_dir)
    store = CorrectionStore.from_settings(settings)
    try:
        # 1. cold start: the project is known from Label Studio; a refresh makes v0 and predicts every task
        sync_project(store, settings, key)
        cold = execute_training(settings, key, "refresh")
        v0 = f"p{project_id}-v0"
        assert cold["state"] == "finished" and cold["version"] == v0 and cold["written"] == len(task_ids), cold
        assert ls.versions_by_task(project_id) == {t: Counter({v0: 1}) for t in task_ids}

        # 2. label 16 tasks, skip one; START_TRAINING syncs, trains, promotes (FORCE_PROMOTE) and refreshes
        labeled = ls.annotate_gold(task_ids, gold, LABELED_PER_LABEL)
        skipped = next(t for t in task_ids if t not in labeled)
        ls.create_annotation(skipped, [], was_cancelled=True)
        untouched = set(labeled) | {skipped}
        unlabeled = [t for t in task_ids if t not in untouched]
        first = execute_training(settings, key, "START_TRAINING")
        v1 = first["version"]
        assert first["promoted"] and v1 != v0, first
        assert first["refresh"]["state"] == "finished" and first["refresh"]["written"] == len(unlabeled), first
        predictions = ls.versions_by_task(project_id)
        assert all(predictions[t] == Counter({v0: 1}) for t in untouched), predictions
        assert all(predictions[t] == Counter({v0: 1, v1: 1}) for t in unlabeled), predictions

        # 3. the user picks v1 as the project's predictions (Settings > Annotation); the next refresh is
        #    interrupted after writing its second page, before moving its cursor, then its job is retried
        ls.request("PATCH", f"/api/projects/{project_id}", json={"model_version": v1})
        original = PredictionRefresh._save_cursor

        def killed(self, project, cursor):
            if cursor.get("pages") == 2:
                raise RuntimeError("worker killed")
            original(self, project, cursor)

        monkeypatch.setattr(PredictionRefresh, "_save_cursor", killed)
        # a new label first (a job on unchanged labels makes no version): the skipped task gets labeled
        # after all, and reaches the store as its webhook would
        ls.create_annotation(skipped, choices(gold[skipped]))
        sync_project(store, settings, key)
        second = execute_training(settings, key, "labels")
        v2 = second["version"]
        assert second["promoted"] and second["refresh"]["state"] == "failed", second
        partly = ls.versions_by_task(project_id)
        assert sum(partly[t][v2] for t in unlabeled) == 10  # two pages of 5 written
        monkeypatch.setattr(PredictionRefresh, "_save_cursor", original)
        # the killed job is retried: its labels did not change, so it makes no version, and it
        # resumes the served version's refresh
        retried = execute_training(settings, key, "labels")
        assert retried["version"] is None and not retried["promoted"], retried
        resumed = retried["refresh"]
        assert resumed["state"] == "finished" and resumed["resumed_after"] is not None, resumed
        assert resumed["already_there"] == 5 and resumed["followed"], resumed
        final = ls.versions_by_task(project_id)
        assert all(final[t] == Counter({v0: 1}) for t in untouched), final
        assert all(final[t] == Counter({v0: 1, v1: 1, v2: 1}) for t in unlabeled), final
        assert ls.project(project_id)["model_version"] == v2

        # 4. Label Studio orders by the new scores: the Data Manager column, and uncertainty sampling
        scores = {p["task"]: p["score"] for p in ls.predictions(project_id) if p["model_version"] == v2}
        query = {"ordering": ["tasks:predictions_score"], "filters": {"conjunction": "and", "items": [
            {"filter": "filter:tasks:total_annotations", "operator": "equal", "type": "Number", "value": 0},
            {"filter": "filter:tasks:cancelled_annotations", "operator": "equal", "type": "Number", "value": 0}]}}
        listed = ls.request("GET", "/api/tasks", params={"project": project_id, "fields": "all", "query": json.dumps(query)})
        shown = [(t["id"], t["predictions_score"]) for t in listed["tasks"]]
        assert [s for _, s in shown] == pytest.approx(sorted(scores[t] for t in unlabeled)), shown
        ls.request("PATCH", f"/api/projects/{project_id}", json={"sampling": "Uncertainty sampling"})
        served = ls.request("GET", f"/api/projects/{project_id}/next")
        assert scores[served["id"]] == min(scores.values()), (served["id"], scores)

        # 5. ls-backend rank: the next batch from the pool, most uncertain first, no labeled task
        for name, value in {"MODEL_DIR": str(settings.model_dir), "LABEL_STUDIO_URL": ls.url,
                            "LABEL_STUDIO_API_KEY": ls.token, "MAX_LENGTH": "128"}.items():
            monkeypatch.setenv(name, value)
        from ls_backend.cli import main

        capsys.readouterr()
        assert main(["rank", "--project", str(project_id), "--n", "4"]) == 0
        ranked = json.loads(capsys.readouterr().out)
        assert ranked["pool_version"] == v2 and not ranked["stale"] and "refresh" not in ranked, ranked
        assert ranked["task_ids"] == sorted(unlabeled, key=lambda t: scores[t])[:4], ranked
        assert registry.current(key) == v2
    finally:
        store.close()


def guessable(task_ids, labeled) -> int:
    """Tasks a job may guess: unlabeled, and outside the evaluation slice (EVAL_SHARE 0.2)."""
    return sum(t not in labeled and not in_eval_slice(t, 0.2) for t in task_ids)


def test_jobs_self_train_on_the_tasks_the_refresh_embedded(label_studio, tmp_path):
    """The pool a refresh keeps of a real project's unlabeled tasks feeds the next job's self-trained
    fast head, with the settings' defaults for precision (the refresh and the job embed alike)."""
    ls = label_studio
    rows = balanced_agnews(25, split="dev", offset=3000)  # 100 tasks
    project = ls.create_project("AG News self-training (e2e)", TOPIC_CONFIG)
    project_id, key = project["id"], project_key(project)
    task_ids = ls.import_tasks(project_id, [{"text": text} for _, text, _ in rows])
    gold = dict(zip(task_ids, (label for _, _, label in rows)))
    settings = Settings(
        model_dir=tmp_path / "models", label_studio_url=ls.url, label_studio_api_key=ls.token,
        train_mode="frozen", force_promote=True, sync_check_interval=0,
    )
    registry = ModelRegistry(settings.model_dir)
    store = CorrectionStore.from_settings(settings)
    try:
        sync_project(store, settings, key)
        cold = execute_training(settings, key, "refresh")  # v0 predicts (and embeds) all 80 tasks
        assert cold["state"] == "finished" and cold["written"] == len(task_ids), cold
        # the pool keeps each task's text as Label Studio serves it: what the full recipe re-reads
        pool = PoolStore(registry).best(key, registry.current(key))
        texts = dict(zip(task_ids, (text for _, text, _ in rows)))
        assert pool.texts == [texts[int(t)] for t in pool.task_ids] and len(pool.texts) == len(task_ids)
        cold_embeddings = {int(t): pool.embeddings[i] for i, t in enumerate(pool.task_ids)}
        labeled = ls.annotate_gold(task_ids, gold, 4)  # 16 labels
        first = execute_training(settings, key, "START_TRAINING")
        meta = registry.meta(key, first["version"])
        # the pool a job guesses from: the unlabeled tasks outside the evaluation slice
        assert meta["training"]["self-train"]["topic"]["pool"] == guessable(task_ids, labeled), meta["training"]
        assert "self-train" in meta["metrics"] and first["refresh"]["written"] == len(task_ids) - len(labeled), first
        # beside the pool, the labeled tasks' embeddings (what "typical" counts as covered): the same
        # vectors the cold start's pool held for those tasks (same weights, same texts)
        pool = PoolStore(registry).best(key, first["version"])
        assert sorted(pool.labeled_ids.tolist()) == sorted(labeled)
        for i, task_id in enumerate(pool.labeled_ids.tolist()):
            assert np.allclose(pool.labeled_embeddings[i], cold_embeddings[task_id], atol=5e-3), task_id
        typical = next_batch(settings, registry, store, key, 5, "typical")
        assert typical.strategy == "typical" and len(set(typical.task_ids)) == 5
        assert not set(typical.task_ids) & set(labeled)
        # four more labels: the next job self-trains on the new version's pool without them
        more = [t for t in task_ids if t not in labeled][:4]
        for task_id in more:
            ls.create_annotation(task_id, choices(gold[task_id]))
        sync_project(store, settings, key)
        second = execute_training(settings, key, "labels")
        meta = registry.meta(key, second["version"])
        assert meta["training"]["self-train"]["topic"]["pool"] == guessable(task_ids, labeled + more), meta
    finally:
        store.close()
