"""Which task should someone label next: score modes, query strategies, the candidate pool, ranking.

Score modes (``SCORE_MODE``)
    Label Studio orders tasks by the prediction ``score``: the Data Manager sorts by it, and
    uncertainty sampling serves the lowest score first.  Every mode maps a row of calibrated
    probabilities to a number in [0, 1] that is *low for the most informative task*, so "sort
    ascending" serves the task the model would learn most from.  With ``p1 >= p2 >= ...`` the
    sorted probabilities of a single-choice control with ``K`` labels:

    ==================  ==============================  ==========================================
    mode                single choice                   ``choice="multiple"`` (labels independent)
    ==================  ==============================  ==========================================
    confidence          ``p1``                          probability that the suggested set is right
    least_confidence    ``p1``                          probability of the most likely label set,
                                                        ``prod(max(p, 1 - p))``
    margin              ``p1 - p2``                     ``min |2p - 1|`` over labels (the margin of
                                                        the least certain label)
    entropy             ``1 - H(p) / ln K``             ``1 - mean H2(p) / ln 2`` (binary entropy)
    ==================  ==============================  ==========================================

    ``confidence`` (the default) is what the backend always wrote: the probability that what it
    suggests is right.  ``least_confidence`` equals it for single choice; for multiple choice it
    scores the model's most likely answer whatever the suggestion threshold.  A task's ``score`` is
    the lowest over its controls; result items keep the calibrated confidence of what they suggest
    in every mode (it is what an annotator reads), and spans (Labels) keep their own confidence.

Query strategies
    Small classes with one :meth:`QueryStrategy.query` over a shared interface:
    ``query(probabilities, embeddings, n, rng) -> indices`` (most informative first).
    :class:`RandomSampling`, :class:`UncertaintySampling` (a score mode),
    :class:`DiverseUncertainty` (the most uncertain candidates, spread over the embedding space by
    weighted k-means) and :class:`CoverageSampling` (the cold start: representatives of k-means
    clusters of the embeddings, no model needed).

The candidate pool
    The refresh after a promotion (``ls_backend.refresh``) predicts every unlabeled task of the
    project (bounded by ``REFRESH_MAX_TASKS``) and keeps, beside what it writes to Label Studio,
    each task's id, embedding and probabilities under ``projects/<key>/pool/<version>/``.
    :func:`next_batch` ranks that pool; tasks labeled since (per the corrections store) are left
    out.  So ``GET /projects/<key>/next`` reads files only: no model, no Label Studio call.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .registry import ModelRegistry, write_atomic

log = logging.getLogger(__name__)

CONFIDENCE, LEAST_CONFIDENCE, MARGIN, ENTROPY = "confidence", "least_confidence", "margin", "entropy"
SCORE_MODES = (CONFIDENCE, MARGIN, ENTROPY, LEAST_CONFIDENCE)
_EPS = 1e-12


# -- score modes ------------------------------------------------------------------------
def mode_scores(probabilities: np.ndarray, mode: str = CONFIDENCE, multiple: bool = False, threshold: float = 0.5) -> np.ndarray:
    """One score in [0, 1] per row of ``probabilities``; ascending = most informative first."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 0.0, 1.0)
    if p.ndim != 2:
        raise ValueError("probabilities must be a 2-D array: one row per task, one column per label")
    rows, k = p.shape
    if rows == 0:
        return np.zeros(0)
    if k == 0:
        return np.ones(rows)
    if mode not in SCORE_MODES:
        raise ValueError(f"unknown score mode {mode!r}; expected one of {', '.join(SCORE_MODES)}")
    if multiple:
        likely = np.prod(np.maximum(p, 1.0 - p), axis=1)
        if mode == CONFIDENCE:
            # as the predictor suggests: the labels at or above the threshold, else the top one alone
            none_picked = ~(p >= threshold).any(axis=1)
            return np.where(none_picked, p.max(axis=1), likely)
        if mode == LEAST_CONFIDENCE:
            return likely
        if mode == MARGIN:
            return np.abs(2.0 * p - 1.0).min(axis=1)
        q = np.clip(p, _EPS, 1.0 - _EPS)
        binary = -(q * np.log(q) + (1.0 - q) * np.log(1.0 - q)) / math.log(2.0)
        return np.clip(1.0 - binary.mean(axis=1), 0.0, 1.0)
    ordered = -np.sort(-p, axis=1)
    if mode in (CONFIDENCE, LEAST_CONFIDENCE):
        return ordered[:, 0]
    if mode == MARGIN:
        return ordered[:, 0] - (ordered[:, 1] if k > 1 else 0.0)
    if k == 1:
        return np.ones(rows)
    total = p.sum(axis=1, keepdims=True)
    q = p / np.where(total > 0, total, 1.0)
    entropy = -(q * np.log(np.clip(q, _EPS, 1.0))).sum(axis=1)
    return np.clip(1.0 - entropy / math.log(k), 0.0, 1.0)


def result_score(mode: str, probabilities: np.ndarray, multiple: bool, threshold: float, confidence: float) -> float:
    """The score one Choices result contributes to its task's ``score`` under ``mode``.

    ``confidence`` is the calibrated probability the predictor computed for its suggestion (the
    result item's own ``score``), used as is in the default mode."""
    if mode == CONFIDENCE:
        return float(confidence)
    return float(mode_scores(np.asarray(probabilities)[None, :], mode, multiple, threshold)[0])


# -- query strategies -------------------------------------------------------------------
class QueryStrategy(ABC):
    """Chooses ``n`` of a pool's rows; returns their indices, most informative first."""

    name = "strategy"
    needs_model = True  # False: works from embeddings alone (before any trained version)

    @abstractmethod
    def query(self, probabilities: np.ndarray | None, embeddings: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _pool_size(probabilities: np.ndarray | None, embeddings: np.ndarray | None) -> int:
    if embeddings is not None:
        return len(embeddings)
    return 0 if probabilities is None else len(probabilities)


class RandomSampling(QueryStrategy):
    name = "random"
    needs_model = False

    def query(self, probabilities, embeddings, n, rng):
        size = _pool_size(probabilities, embeddings)
        return rng.permutation(size)[: max(0, min(n, size))]


class UncertaintySampling(QueryStrategy):
    """The ``n`` rows with the lowest score under a score mode (ties: pool order)."""

    name = "uncertainty"

    def __init__(self, mode: str = CONFIDENCE, multiple: bool = False, threshold: float = 0.5):
        if mode not in SCORE_MODES:
            raise ValueError(f"unknown score mode {mode!r}")
        self.mode, self.multiple, self.threshold = mode, multiple, threshold

    def scores(self, probabilities: np.ndarray) -> np.ndarray:
        return mode_scores(probabilities, self.mode, self.multiple, self.threshold)

    def query(self, probabilities, embeddings, n, rng):
        if probabilities is None:
            raise ValueError("uncertainty sampling needs the model's probabilities")
        scores = self.scores(probabilities)
        return np.argsort(scores, kind="stable")[: max(0, min(n, len(scores)))]

    def __repr__(self) -> str:
        return f"UncertaintySampling(mode={self.mode!r})"


class DiverseUncertainty(UncertaintySampling):
    """Among the ``candidates * n`` most uncertain rows, one per cluster of a k-means with ``n``
    clusters over their embeddings (weighted by how uncertain each is): the member nearest its
    cluster's centre.  A batch of 20 is then 20 different kinds of hard task, not 20 near
    duplicates of one."""

    name = "diverse"

    def __init__(self, mode: str = CONFIDENCE, multiple: bool = False, threshold: float = 0.5, candidates: int = 10):
        super().__init__(mode, multiple, threshold)
        self.candidates = max(1, int(candidates))

    def query(self, probabilities, embeddings, n, rng):
        if probabilities is None or embeddings is None:
            raise ValueError("diverse uncertainty sampling needs probabilities and embeddings")
        scores = self.scores(probabilities)
        n = max(0, min(n, len(scores)))
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        order = np.argsort(scores, kind="stable")
        pool = order[: min(len(order), max(n, self.candidates * n))]
        weights = 1.0 - scores[pool] + 1e-3
        picked = representatives(np.asarray(embeddings, dtype=np.float32)[pool], n, rng, weights)
        chosen = [int(pool[i]) for i in picked]
        if len(chosen) < n:  # fewer distinct clusters than n: fill up by uncertainty
            taken = set(chosen)
            chosen += [int(i) for i in pool if int(i) not in taken][: n - len(chosen)]
        chosen.sort(key=lambda i: (scores[i], i))
        return np.asarray(chosen, dtype=np.int64)

    def __repr__(self) -> str:
        return f"DiverseUncertainty(mode={self.mode!r}, candidates={self.candidates})"


class CoverageSampling(QueryStrategy):
    """The cold start: one representative per cluster of a k-means with ``n`` clusters over all
    embeddings, largest cluster first.  Needs no model, so an untrained head's guesses do not
    decide the first batch."""

    name = "coverage"
    needs_model = False

    def __init__(self, max_points: int = 20_000):
        self.max_points = max_points

    def query(self, probabilities, embeddings, n, rng):
        if embeddings is None:
            raise ValueError("coverage sampling needs embeddings")
        x = np.asarray(embeddings, dtype=np.float32)
        n = max(0, min(n, len(x)))
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        rows = np.arange(len(x))
        if len(x) > self.max_points:  # the clusters of a large pool are found on a sample
            rows = np.sort(rng.choice(len(x), self.max_points, replace=False))
        picked = representatives(x[rows], n, rng)
        chosen = [int(rows[i]) for i in picked]
        if len(chosen) < n:
            taken = set(chosen)
            chosen += [int(i) for i in rng.permutation(len(x)) if int(i) not in taken][: n - len(chosen)]
        return np.asarray(chosen, dtype=np.int64)


def kmeans(x: np.ndarray, k: int, rng: np.random.Generator, weights: np.ndarray | None = None,
           iterations: int = 15) -> tuple[np.ndarray, np.ndarray]:
    """Weighted k-means with k-means++ seeding: (centres, cluster of each row)."""
    n = len(x)
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    k = max(1, min(k, n))
    squared = (x.astype(np.float64) ** 2).sum(axis=1)

    def distances(centres: np.ndarray) -> np.ndarray:
        d = squared[:, None] - 2.0 * x.astype(np.float64) @ centres.T + (centres**2).sum(axis=1)[None, :]
        return np.maximum(d, 0.0)

    first = int(rng.choice(n, p=w / w.sum()))
    centres = [x[first].astype(np.float64)]
    nearest = distances(np.asarray(centres))[:, 0]
    for _ in range(1, k):
        mass = nearest * w
        total = mass.sum()
        pick = int(rng.choice(n, p=mass / total)) if total > 0 else int(rng.integers(n))
        centres.append(x[pick].astype(np.float64))
        nearest = np.minimum(nearest, distances(np.asarray(centres[-1:]))[:, 0])
    centres_arr = np.asarray(centres)
    assign = distances(centres_arr).argmin(axis=1)
    for _ in range(iterations):
        for c in range(k):
            members = assign == c
            if members.any():
                centres_arr[c] = np.average(x[members], axis=0, weights=w[members])
        updated = distances(centres_arr).argmin(axis=1)
        if np.array_equal(updated, assign):
            break
        assign = updated
    return centres_arr, assign


def inertia(x: np.ndarray, centres: np.ndarray, assign: np.ndarray, weights: np.ndarray) -> float:
    return float((weights * ((x - centres[assign]) ** 2).sum(axis=1)).sum())


def representatives(x: np.ndarray, k: int, rng: np.random.Generator, weights: np.ndarray | None = None,
                    restarts: int = 4) -> list[int]:
    """For each of ``k`` weighted k-means clusters of ``x`` (the best of ``restarts`` runs), its
    member nearest the centre; largest cluster (by weight) first."""
    if len(x) == 0 or k <= 0:
        return []
    w = np.ones(len(x)) if weights is None else np.asarray(weights, dtype=np.float64)
    runs = [kmeans(x, k, rng, w) for _ in range(max(1, restarts))]
    centres, assign = min(runs, key=lambda run: inertia(x, run[0], run[1], w))
    picked = []
    for c in range(len(centres)):
        members = np.flatnonzero(assign == c)
        if not len(members):
            continue
        d = ((x[members] - centres[c]) ** 2).sum(axis=1)
        picked.append((-w[members].sum(), int(members[int(d.argmin())])))
    picked.sort()
    return [index for _, index in picked]


STRATEGIES = ("uncertainty", "diverse", "random", "coverage")


def strategy_for(name: str, mode: str = CONFIDENCE, multiple: bool = False, threshold: float = 0.5) -> QueryStrategy:
    if name == "uncertainty":
        return UncertaintySampling(mode, multiple, threshold)
    if name == "diverse":
        return DiverseUncertainty(mode, multiple, threshold)
    if name == "random":
        return RandomSampling()
    if name == "coverage":
        return CoverageSampling()
    raise ValueError(f"unknown strategy {name!r}; expected one of {', '.join(STRATEGIES)}")


# -- the candidate pool -----------------------------------------------------------------
@dataclass
class Pool:
    """What the last refresh saw of a project's unlabeled tasks, in task id order."""

    version: str
    meta: dict
    task_ids: np.ndarray  # int64
    embeddings: np.ndarray  # float32, unit rows
    probabilities: np.ndarray | None  # the primary Choices control's, or None
    scores: np.ndarray  # the task scores written to Label Studio
    complete: bool = False
    texts: list[str] | None = None  # the text each embedding was made from; None for pools without them

    @property
    def trained(self) -> bool:
        return bool(self.meta.get("trained"))

    def __len__(self) -> int:
        return len(self.task_ids)


@dataclass
class PoolPart:
    task_ids: list[int]
    embeddings: np.ndarray
    probabilities: np.ndarray | None
    scores: list[float]
    texts: list[str] | None = None  # one per task id: what the job re-embeds with a tuned encoder


class PoolStore:
    """``projects/<key>/pool/<version>/``: ``meta.json`` and one ``part-*.npz`` per refresh page.

    Parts are written atomically, one per page, before the refresh cursor moves past that
    page, so a refresh that restarts finds the parts of the pages it already did."""

    def __init__(self, registry: ModelRegistry):
        self.registry = registry

    def root(self, project_key: str) -> Path:
        return self.registry.project_dir(project_key) / "pool"

    def folder(self, project_key: str, version: str) -> Path:
        if "/" in version or version.startswith("."):
            raise ValueError(f"bad version name {version!r}")
        return self.root(project_key) / version

    def start(self, project_key: str, version: str, meta: dict) -> None:
        """A fresh pool for ``version`` (anything left of an earlier try is dropped)."""
        folder = self.folder(project_key, version)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        body = dict(meta, version=version, complete=False, started_at=time.time())
        write_atomic(folder / "meta.json", json.dumps(body, indent=2, sort_keys=True).encode())

    def add(self, project_key: str, version: str, part: PoolPart) -> None:
        if not part.task_ids:
            return
        folder = self.folder(project_key, version)
        name = f"part-{min(part.task_ids):012d}-{max(part.task_ids):012d}.npz"
        tmp = folder / f".{name}.{uuid.uuid4().hex}.tmp.npz"
        arrays: dict[str, Any] = {
            "task_ids": np.asarray(part.task_ids, dtype=np.int64),
            "embeddings": np.asarray(part.embeddings, dtype=np.float16),
            "scores": np.asarray(part.scores, dtype=np.float32),
        }
        if part.probabilities is not None:
            arrays["probabilities"] = np.asarray(part.probabilities, dtype=np.float32)
        if part.texts is not None:
            if len(part.texts) != len(part.task_ids):
                raise ValueError(f"{len(part.texts)} texts for {len(part.task_ids)} tasks")
            # UTF-8 JSON bytes: no pickled objects in the pool (np.load's allow_pickle stays off)
            arrays["texts"] = np.frombuffer(json.dumps(list(part.texts)).encode(), dtype=np.uint8)
        np.savez(tmp, **arrays)
        tmp.replace(folder / name)

    def finish(self, project_key: str, version: str, report: dict) -> None:
        """Mark ``version``'s pool complete and drop the pools of other versions."""
        folder = self.folder(project_key, version)
        meta = self._meta(folder) or {}
        meta.update(complete=True, finished_at=time.time(), report=report)
        write_atomic(folder / "meta.json", json.dumps(meta, indent=2, sort_keys=True).encode())
        for other in self.root(project_key).iterdir():
            if other.is_dir() and other.name != version:
                shutil.rmtree(other, ignore_errors=True)

    @staticmethod
    def _meta(folder: Path) -> dict | None:
        try:
            return json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError):
            return None

    def load(self, project_key: str, version: str) -> Pool | None:
        folder = self.folder(project_key, version)
        meta = self._meta(folder)
        if meta is None:
            return None
        ids, embeddings, probabilities, scores, texts = [], [], [], [], []
        for path in sorted(folder.glob("part-*.npz")):
            with np.load(path) as part:
                ids.append(part["task_ids"])
                embeddings.append(part["embeddings"].astype(np.float32))
                scores.append(part["scores"])
                if "probabilities" in part:
                    probabilities.append(part["probabilities"])
                if "texts" in part:
                    texts.extend(json.loads(part["texts"].tobytes().decode()))
        pool_texts = None
        if ids:
            task_ids = np.concatenate(ids)
            order = np.argsort(task_ids, kind="stable")
            task_ids, first = np.unique(task_ids[order], return_index=True)  # a page redone after a crash
            keep = order[first]
            emb = np.concatenate(embeddings)[keep]
            sc = np.concatenate(scores)[keep]
            probs = np.concatenate(probabilities)[keep] if len(probabilities) == len(ids) else None
            if len(texts) == sum(len(i) for i in ids):  # every part has its texts
                pool_texts = [texts[i] for i in keep]
        else:
            task_ids = np.zeros(0, dtype=np.int64)
            emb = np.zeros((0, int(meta.get("dim", 0))), dtype=np.float32)
            sc = np.zeros(0, dtype=np.float32)
            probs = None
        return Pool(version, meta, task_ids, emb, probs, sc, complete=bool(meta.get("complete")), texts=pool_texts)

    def best(self, project_key: str, current: str | None) -> Pool | None:
        """The current version's pool when complete; else the newest complete one; else whatever exists."""
        root = self.root(project_key)
        if not root.is_dir():
            return None
        metas = {p.name: self._meta(p) for p in root.iterdir() if p.is_dir()}
        metas = {name: meta for name, meta in metas.items() if meta is not None}
        if not metas:
            return None

        def rank(name: str) -> tuple:
            meta = metas[name]
            return (bool(meta.get("complete")), name == current, meta.get("started_at", 0.0))

        return self.load(project_key, max(metas, key=rank))


# -- ranking ----------------------------------------------------------------------------
class NoPool(LookupError):
    """No refresh has seen this project's unlabeled tasks yet."""


@dataclass
class NextBatch:
    project: str
    strategy: str
    task_ids: list[int]
    scores: list[float | None]
    pool_version: str
    current_version: str | None
    pool_size: int
    pool_complete: bool
    left_out_labeled: int
    score_mode: str

    @property
    def stale(self) -> bool:
        return self.pool_version != self.current_version or not self.pool_complete

    def to_dict(self) -> dict:
        return {
            "project": self.project,
            "strategy": self.strategy,
            "n": len(self.task_ids),
            "task_ids": self.task_ids,
            "tasks": [{"id": t, "score": s} for t, s in zip(self.task_ids, self.scores)],
            "score_mode": self.score_mode,
            "pool_version": self.pool_version,
            "current_version": self.current_version,
            "stale": self.stale,
            "pool_size": self.pool_size,
            "pool_complete": self.pool_complete,
            "left_out_labeled": self.left_out_labeled,
        }


def labeled_task_ids(store, project_key: str, control: str | None) -> set[int]:
    """Tasks with a live annotation in the corrections store (what the webhooks and syncs told us)."""
    if store is None or not control:
        return set()
    try:
        return {task_id for task_id, _text, _items in store.annotation_results(project_key, control, include_empty=True)}
    except Exception:  # an unknown project, a store that cannot be read: rank what the pool holds
        log.debug("project %s: labeled tasks unknown", project_key, exc_info=True)
        return set()


def next_batch(settings, registry: ModelRegistry, store, project_key: str, n: int, strategy: str | None = None,
               seed: int | None = None) -> NextBatch:
    """The next ``n`` unlabeled task ids to label, from the project's candidate pool.

    Before any trained version (the pool was made by the cold start's zero-shot heads) the
    batch is chosen for coverage whatever ``strategy`` says, except ``random``."""
    current = registry.current(project_key)
    pool = PoolStore(registry).best(project_key, current)
    if pool is None:
        raise NoPool(f"project {project_key}: no refresh has listed its unlabeled tasks yet")
    labeled = labeled_task_ids(store, project_key, pool.meta.get("control"))
    keep = np.asarray([int(t) not in labeled for t in pool.task_ids], dtype=bool)
    ids = pool.task_ids[keep]
    embeddings = pool.embeddings[keep]
    probabilities = pool.probabilities[keep] if pool.probabilities is not None else None
    scores = pool.scores[keep]
    name = strategy or "uncertainty"
    if name != "random" and (not pool.trained or probabilities is None):
        name = "coverage"
    chooser = strategy_for(name, settings.score_mode, bool(pool.meta.get("multiple")), float(pool.meta.get("threshold", 0.5)))
    rng = np.random.default_rng(settings.seed if seed is None else seed)
    picked = chooser.query(probabilities, embeddings, n, rng) if len(ids) else np.zeros(0, dtype=np.int64)
    return NextBatch(
        project=project_key,
        strategy=name,
        task_ids=[int(ids[i]) for i in picked],
        scores=[round(float(scores[i]), 6) for i in picked],
        pool_version=pool.version,
        current_version=current,
        pool_size=int(len(ids)),
        pool_complete=pool.complete,
        left_out_labeled=int((~keep).sum()),
        score_mode=settings.score_mode,
    )
