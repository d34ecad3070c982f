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

import contextlib
import io
import json
import logging
import math
import os
import shutil
import time
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
            # as the predictor suggests: the labels at or above the threshold, else the top one alone;
            # the probability that exactly the suggested set is right
            suggested = p >= threshold
            none_picked = ~suggested.any(axis=1)
            right = np.prod(np.where(suggested, p, 1.0 - p), axis=1)
            return np.where(none_picked, p.max(axis=1), right)
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


def _candidates(embeddings: np.ndarray | None, n: int, what: str) -> tuple[np.ndarray, int]:
    """The candidates' embeddings (float32) and the batch size they allow (at most ``n``)."""
    if embeddings is None:
        raise ValueError(f"{what} needs embeddings")
    x = np.asarray(embeddings, dtype=np.float32)
    return x, max(0, min(n, len(x)))


def _fill_at_random(chosen: list[int], size: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``chosen``, filled up to ``n`` distinct rows of ``size`` with rows drawn at random."""
    if len(chosen) < n:
        taken = set(chosen)
        chosen = chosen + [int(i) for i in rng.permutation(size) if int(i) not in taken][: n - len(chosen)]
    return np.asarray(chosen, dtype=np.int64)


class RandomSampling(QueryStrategy):
    name = "random"
    needs_model = False

    def query(self, probabilities, embeddings, n, rng):
        size = _pool_size(probabilities, embeddings)
        return rng.permutation(size)[: max(0, min(n, size))]


class UncertaintySampling(QueryStrategy):
    """The ``n`` rows with the lowest score under a score mode (ties: pool order)."""

    name = "uncertainty"

    def __init__(self, mode: str = CONFIDENCE, multiple: bool = False, threshold: float = 0.5, given: bool = False):
        if mode not in SCORE_MODES:
            raise ValueError(f"unknown score mode {mode!r}")
        self.mode, self.multiple, self.threshold = mode, multiple, threshold
        self.given = given  # ``probabilities`` are the tasks' scores already (an entity-only pool)

    def scores(self, probabilities: np.ndarray) -> np.ndarray:
        if self.given:
            return np.asarray(probabilities, dtype=np.float64).reshape(-1)
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

    def __init__(self, mode: str = CONFIDENCE, multiple: bool = False, threshold: float = 0.5, candidates: int = 10,
                 given: bool = False):
        super().__init__(mode, multiple, threshold, given)
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
        x, n = _candidates(embeddings, n, "coverage sampling")
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        rows = np.arange(len(x))
        if len(x) > self.max_points:  # the clusters of a large pool are found on a sample
            rows = np.sort(rng.choice(len(x), self.max_points, replace=False))
        picked = representatives(x[rows], n, rng)
        return _fill_at_random([int(rows[i]) for i in picked], len(x), n, rng)


class TypicalCoverage(QueryStrategy):
    """Typical examples of what no label covers yet (TypiClust: Hacohen, Dekel and Weinshall, 2022).

    The labeled tasks' embeddings and the candidates' are clustered together by k-means into
    (labeled + ``n``) clusters, at most ``max_clusters``.  The clusters are taken with no labeled
    task first (the least labeled per member after them), largest first; each gives its most
    typical candidate: the one with the smallest mean distance to its ``neighbours`` nearest
    cluster-mates.  Clusters of fewer than ``min_cluster`` points (outliers) come last.  So a batch fills the largest regions of the data that no label speaks for yet,
    with examples that stand for them rather than with outliers.  Needs no model: before any label
    it is coverage by typical examples.  Of more than ``max_points / 2`` labeled tasks, a sample
    of that many stands for them, so the candidates always fill the other half."""

    name = "typical"
    needs_model = False
    BLOCK = 1024  # candidates whose distances to the cluster's mates are held at once

    def __init__(self, labeled: np.ndarray | None = None, neighbours: int = 20, max_clusters: int = 500,
                 max_points: int = 20_000, max_mates: int = 2_000, min_cluster: int = 5):
        self.labeled = np.zeros((0, 0), dtype=np.float32) if labeled is None else np.asarray(labeled, dtype=np.float32)
        self.neighbours, self.max_clusters = max(1, neighbours), max(1, max_clusters)
        self.max_points, self.max_mates, self.min_cluster = max_points, max_mates, min_cluster

    def query(self, probabilities, embeddings, n, rng):
        x, n = _candidates(embeddings, n, "typical coverage")
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        labeled = self.labeled if self.labeled.size and self.labeled.shape[1] == x.shape[1] else x[:0]
        if len(labeled) > self.max_points // 2:  # a sample of the labeled tasks leaves room for the candidates
            labeled = labeled[np.sort(rng.choice(len(labeled), self.max_points // 2, replace=False))]
        rows = np.arange(len(x))
        room = max(n, self.max_points - len(labeled))
        if len(x) > room:  # the clusters of a large pool are found on a sample of its candidates
            rows = np.sort(rng.choice(len(x), room, replace=False))
        points = np.concatenate([labeled, x[rows]])
        k = min(len(labeled) + n, self.max_clusters, len(points))
        _, assign = kmeans(points, k, rng)
        of_labeled, of_rows = assign[: len(labeled)], assign[len(labeled):]
        sizes = np.bincount(assign, minlength=k)
        covered = np.bincount(of_labeled, minlength=k) / np.maximum(sizes, 1)
        # the least covered clusters first, largest first; clusters of fewer than min_cluster points
        # (outliers) only once the others have no candidate left
        order = sorted(range(k), key=lambda c: (covered[c], -sizes[c], c))
        groups: tuple[list, list] = ([], [])  # per cluster in that order, its candidates by typicality
        for c in order:
            candidates = np.flatnonzero(of_rows == c)
            if len(candidates):
                typical = self.typicality(points, np.flatnonzero(assign == c), len(labeled) + candidates, rng)
                groups[int(sizes[c] < self.min_cluster)].append(candidates[np.argsort(-typical, kind="stable")])
        chosen: list[int] = []
        for ranked in groups:
            depth = 0
            while len(chosen) < n and ranked:  # the most typical of each cluster, then the next of each...
                ranked = [r for r in ranked if len(r) > depth]
                for candidates in ranked:
                    if len(chosen) == n:
                        break
                    chosen.append(int(rows[candidates[depth]]))
                depth += 1
        return _fill_at_random(chosen, len(x), n, rng)  # short only on a sample of a large pool

    def typicality(self, points: np.ndarray, members: np.ndarray, which: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """1 / mean Euclidean distance of each of ``which`` to its nearest ``neighbours`` in ``members``."""
        mates = members if len(members) <= self.max_mates else rng.choice(members, self.max_mates, replace=False)
        b = points[mates].astype(np.float64)
        b_squared = (b**2).sum(axis=1)[None, :]
        k = min(self.neighbours, max(1, len(mates) - 1))
        out = np.empty(len(which))
        # in blocks of rows: one cluster may hold all of a 20,000-task pool, and a whole matrix of its
        # distances to 2,000 mates took 320 MB a copy
        for start in range(0, len(which), self.BLOCK):
            rows = which[start : start + self.BLOCK]
            a = points[rows].astype(np.float64)
            distance = (a**2).sum(axis=1)[:, None] - 2.0 * a @ b.T + b_squared
            np.sqrt(np.maximum(distance, 0.0, out=distance), out=distance)
            distance[rows[:, None] == mates[None, :]] = np.inf  # not its own neighbour
            nearest = np.partition(distance, k - 1, axis=1)[:, :k]
            finite = np.isfinite(nearest)
            mean = np.where(finite, nearest, 0.0).sum(axis=1) / np.maximum(finite.sum(axis=1), 1)
            out[start : start + len(rows)] = np.where(finite.any(axis=1), 1.0 / (mean + 1e-9), 0.0)  # alone: least typical
        return out

    def __repr__(self) -> str:
        return f"TypicalCoverage(labeled={len(self.labeled)}, neighbours={self.neighbours})"


def kmeans(x: np.ndarray, k: int, rng: np.random.Generator, weights: np.ndarray | None = None,
           iterations: int = 15) -> tuple[np.ndarray, np.ndarray]:
    """Weighted k-means with k-means++ seeding: (centres, cluster of each row)."""
    n = len(x)
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    k = max(1, min(k, n))
    x = np.asarray(x, dtype=np.float64)  # once: a cast per call was half the cost of 500 clusters
    squared = (x**2).sum(axis=1)

    def distances(centres: np.ndarray) -> np.ndarray:
        d = squared[:, None] - 2.0 * x @ centres.T + (centres**2).sum(axis=1)[None, :]
        return np.maximum(d, 0.0)

    # k-means++ seeding: one pass over the rows per centre, in float32 (half the memory to read;
    # the distances only weigh the draws), then Lloyd's iterations in float64
    x32 = x.astype(np.float32)
    squared32 = squared.astype(np.float32)

    def to(row: int) -> np.ndarray:
        return np.maximum(squared32 - 2.0 * (x32 @ x32[row]) + squared32[row], 0.0).astype(np.float64)

    first = int(rng.choice(n, p=w / w.sum()))
    picks = [first]
    nearest = to(first)
    for _ in range(1, k):
        mass = nearest * w
        total = mass.sum()
        pick = int(rng.choice(n, p=mass / total)) if total > 0 else int(rng.integers(n))
        picks.append(pick)
        nearest = np.minimum(nearest, to(pick))
    centres_arr = x[picks]  # a copy: the iterations below move it
    assign = distances(centres_arr).argmin(axis=1)
    weighted = x * w[:, None]
    for _ in range(iterations):
        # each centre moves to its members' weighted mean (one pass over the rows sorted by cluster)
        order = np.argsort(assign, kind="stable")
        present, starts = np.unique(assign[order], return_index=True)
        mass = np.add.reduceat(w[order], starts)
        keep = mass > 0
        sums = np.add.reduceat(weighted[order], starts, axis=0)
        centres_arr[present[keep]] = sums[keep] / mass[keep, None]
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


STRATEGIES = ("uncertainty", "diverse", "random", "coverage", "typical")


def strategy_for(name: str, mode: str = CONFIDENCE, multiple: bool = False, threshold: float = 0.5,
                 labeled: np.ndarray | None = None, given: bool = False) -> QueryStrategy:
    """The strategy called ``name``; ``labeled``: the labeled tasks' embeddings (``typical`` reads them);
    ``given``: the uncertainty strategies rank scores they are given instead of probabilities."""
    if name == "typical":
        return TypicalCoverage(labeled)
    if name == "uncertainty":
        return UncertaintySampling(mode, multiple, threshold, given=given)
    if name == "diverse":
        return DiverseUncertainty(mode, multiple, threshold, given=given)
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
    labeled_ids: np.ndarray | None = None  # the tasks labeled when the refresh ran, and their embeddings
    labeled_embeddings: np.ndarray | None = None

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

    def exists(self, project_key: str, version: str) -> bool:
        return self._meta(self.folder(project_key, version)) is not None

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
        self._write(folder / name, arrays)

    def add_unreadable(self, project_key: str, version: str, task_ids: list[int]) -> None:
        """Tasks a refresh of ``version`` found no text in (``unreadable-*.npz``): a top-up passes over them."""
        if task_ids:
            name = f"unreadable-{min(task_ids):012d}-{max(task_ids):012d}.npz"
            self._write(self.folder(project_key, version) / name, {"task_ids": np.asarray(task_ids, dtype=np.int64)})

    def unreadable(self, project_key: str, version: str) -> set[int]:
        found: set[int] = set()
        for path in self.folder(project_key, version).glob("unreadable-*.npz"):
            with np.load(path) as part:
                found.update(part["task_ids"].tolist())
        return found

    def add_labeled(self, project_key: str, version: str, task_ids: list[int], embeddings: np.ndarray) -> None:
        """The embeddings of the tasks labeled when the refresh ran (``labeled.npz``): what the
        ``typical`` strategy counts as covered."""
        self._write(self.folder(project_key, version) / "labeled.npz", {
            "task_ids": np.asarray(task_ids, dtype=np.int64),
            "embeddings": np.asarray(embeddings, dtype=np.float16),
        })

    @staticmethod
    def _write(path: Path, arrays: dict[str, Any]) -> None:
        """``arrays`` as ``path`` (.npz), atomically: a reader sees the old file or the whole new one."""
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        write_atomic(path, buffer.getvalue())

    def finish(self, project_key: str, version: str, report: dict, keep: str | None = None) -> None:
        """Mark ``version``'s pool complete and drop the pools of other versions (but ``keep``'s)."""
        folder = self.folder(project_key, version)
        meta = self._meta(folder) or {}
        meta.update(complete=True, finished_at=time.time(), report=report, parts=len(list(folder.glob("part-*.npz"))))
        write_atomic(folder / "meta.json", json.dumps(meta, indent=2, sort_keys=True).encode())
        for other in self.root(project_key).iterdir():
            if other.is_dir() and other.name not in (version, keep):
                # out of readers' sight in one rename, then removed: never seen half gone
                gone = other
                if not other.name.startswith("."):
                    with contextlib.suppress(OSError):
                        gone = other.rename(other.with_name(f".gone-{other.name}-{os.getpid()}"))
                shutil.rmtree(gone, ignore_errors=True)

    @staticmethod
    def _meta(folder: Path) -> dict | None:
        try:
            return json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError):
            return None

    def load(self, project_key: str, version: str) -> Pool | None:
        """``version``'s pool; FileNotFoundError where a refresh removed it (or began it again) while
        it was read: its parts went one by one, and a complete pool with parts missing is no pool."""
        folder = self.folder(project_key, version)
        meta = self._meta(folder)
        if meta is None:
            return None
        parts = sorted(folder.glob("part-*.npz"))
        if len(parts) < int(meta.get("parts", 0)):  # (a top-up adds parts; none is ever taken away)
            raise FileNotFoundError(f"pool {version}: {len(parts)} of its {meta['parts']} parts left (removed meanwhile)")
        ids, embeddings, probabilities, scores, texts = [], [], [], [], []
        for path in parts:
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
            # one row per task, the last written: a page redone after a crash, or a task id Label Studio
            # gave again to a new task (its top-up row replaces the deleted task's)
            order = np.argsort(task_ids[::-1], kind="stable")
            task_ids, first = np.unique(task_ids[::-1][order], return_index=True)
            keep = len(order) - 1 - order[first]
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
        labeled_ids = labeled_embeddings = None
        if (folder / "labeled.npz").is_file():
            with np.load(folder / "labeled.npz") as part:
                labeled_ids, labeled_embeddings = part["task_ids"], part["embeddings"].astype(np.float32)
        return Pool(version, meta, task_ids, emb, probs, sc, complete=bool(meta.get("complete")), texts=pool_texts,
                    labeled_ids=labeled_ids, labeled_embeddings=labeled_embeddings)

    def best(self, project_key: str, current: str | None, tries: int = 3) -> Pool | None:
        """The current version's pool when complete; else the newest complete one; else whatever exists."""
        root = self.root(project_key)
        if not root.is_dir():
            return None
        metas = {p.name: self._meta(p) for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
        metas = {name: meta for name, meta in metas.items() if meta is not None}
        if not metas:
            return None

        def rank(name: str) -> tuple:
            meta = metas[name]
            return (bool(meta.get("complete")), name == current, meta.get("started_at", 0.0))

        try:
            return self.load(project_key, max(metas, key=rank))
        except FileNotFoundError:  # a refresh finishing now removed that pool: choose again
            if tries <= 1:
                raise
            return self.best(project_key, current, tries - 1)


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
    pool_bounded: bool = False  # its refresh stopped at REFRESH_MAX_TASKS: Label Studio has more unlabeled tasks

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


def skipped_task_ids(store, project_key: str, since: float | None = None) -> set[int]:
    """Tasks an annotator skipped, or Label Studio deleted (at or after ``since``: the refresh that
    listed them started then, so a task deleted before is a new one under the same id), since the
    refresh listed them (none where the store cannot tell)."""
    if store is None:
        return set()
    # a store that cannot be read raises: a batch of tasks already labeled is no answer
    return store.skipped_task_ids(project_key) | store.deleted_task_ids(project_key, since)


def labeled_task_ids(store, project_key: str) -> set[int]:
    """Tasks with a live annotation in the corrections store (what the webhooks and syncs told us),
    whichever controls it answers: a pool of an entities-only config has no classification control."""
    if store is None:
        return set()
    return store.annotated_task_ids(project_key)  # (none for a project the store does not know)


def covered_embeddings(pool: Pool, labeled_since: np.ndarray) -> np.ndarray:
    """The embeddings of the tasks labeled when the refresh ran (``labeled.npz``) and of the pool's
    tasks labeled since (``labeled_since``, a mask over its rows), each task once: a task labeled
    while the refresh ran can be in both."""
    since = np.asarray(labeled_since, dtype=bool)
    parts = []
    if pool.labeled_embeddings is not None and pool.labeled_embeddings.shape[1:] == pool.embeddings.shape[1:]:
        parts.append(pool.labeled_embeddings)
        if pool.labeled_ids is not None:
            since = since & ~np.isin(pool.task_ids, pool.labeled_ids)
    parts.append(pool.embeddings[since])
    # a row that is not finite (a half-precision overflow) would turn every k-means distance into NaN
    return np.nan_to_num(np.concatenate(parts), nan=0.0, posinf=0.0, neginf=0.0)


def next_batch(settings, registry: ModelRegistry, store, project_key: str, n: int, strategy: str | None = None,
               seed: int | None = None) -> NextBatch:
    """The next ``n`` unlabeled task ids to label, from the project's candidate pool.

    Before any trained version (the pool was made by the cold start's zero-shot heads) the
    batch is chosen for coverage whatever ``strategy`` says, except ``random``."""
    current = registry.served_version(project_key)  # (a stand-in's complete pool is not stale)
    pool = PoolStore(registry).best(project_key, current)
    if pool is None:
        raise NoPool(f"project {project_key}: no refresh has listed its unlabeled tasks yet")
    labeled = labeled_task_ids(store, project_key)
    skipped = skipped_task_ids(store, project_key, pool.meta.get("started_at"))
    was_labeled = np.asarray([int(t) in labeled for t in pool.task_ids], dtype=bool)
    keep = ~was_labeled & np.asarray([int(t) not in skipped for t in pool.task_ids], dtype=bool)
    ids = pool.task_ids[keep]
    # a row that is not finite (a half-precision overflow) ranks as the most uncertain, never as a
    # 500 or a NaN in the answer's JSON
    embeddings = np.nan_to_num(pool.embeddings[keep], nan=0.0, posinf=0.0, neginf=0.0)
    probabilities = pool.probabilities[keep] if pool.probabilities is not None else None
    scores = np.where(np.isfinite(pool.scores[keep]), pool.scores[keep], 0.0)
    multiple, threshold = bool(pool.meta.get("multiple")), float(pool.meta.get("threshold", 0.5))
    if probabilities is not None and probabilities.ndim == 2 and probabilities.shape[1]:
        # the first classification control's scores under this SCORE_MODE: what the batch is ranked by,
        # and what it shows (the scores the refresh wrote are the lowest over every control, in the mode
        # of that time); a row that is not finite scores 0, below any other
        broken = ~np.isfinite(probabilities).all(axis=1)
        scores = mode_scores(np.nan_to_num(probabilities, nan=0.0, posinf=1.0, neginf=0.0), settings.score_mode,
                             multiple, threshold)
        scores[broken] = 0.0
    name = strategy or "uncertainty"
    if name not in ("random", "typical") and not pool.trained:
        name = "coverage"
    # ranked by those scores; a pool without a classification control (entities only) by the task
    # scores its refresh wrote to Label Studio: the least sure span, or the least sure "no entity"
    given = name in ("uncertainty", "diverse")
    probabilities = scores if given else probabilities
    covered = covered_embeddings(pool, was_labeled) if name == "typical" else None
    chooser = strategy_for(name, settings.score_mode, multiple, threshold, labeled=covered, given=given)
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
        pool_bounded=bool((pool.meta.get("report") or {}).get("bounded")),
    )
