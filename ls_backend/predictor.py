"""Load a project's current version, run it on tasks, decode Label Studio results.

One :class:`Predictor` per process.  The base encoder is loaded once when the
predictor is built; a fine-tuned encoder is loaded once per version, in a
background thread, while the previous version keeps serving, and released once no
project serves it any more.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .labeling import CHOICES, LABELS, LabelingPlan, UnsupportedConfig, field_value, plan_for, shown_controls
from .model import ClassifierHead, Encoder, clip_visible, reads_nothing, resolve_device
from .ner import TokenHead, encode_with_tokens
from .registry import LoadedHeads, ModelRegistry, built_on_other_base, version_prefix
from .sampling import result_score
from .settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Serving:
    """What one project is served with right now in this process."""

    version: str
    heads: dict[str, ClassifierHead]
    encoder: Encoder
    signature: str | None
    checked_at: float = 0.0
    loading: str | None = None  # a version being loaded in the background
    used_at: float = 0.0  # the last request that read it (which fine-tuned encoders stay loaded)


@dataclass
class TaskText:
    """The text a control reads from one task, or why it cannot."""

    text: str | None
    problem: str | None = None


def read_text(task: Any, data_field: str) -> TaskText:
    if not isinstance(task, dict):
        return TaskText(None, "task is not a JSON object")
    data = task.get("data")
    if not isinstance(data, dict):
        return TaskText(None, "task has no 'data' object")
    value = field_value(data, data_field)
    if value is None and data_field not in data:  # (a field set to null is "not a string", below)
        return TaskText(None, f"task data has no field {data_field!r}")
    if not isinstance(value, str):
        return TaskText(None, f"task data field {data_field!r} is not a string")
    if not value.strip():
        return TaskText(None, f"task data field {data_field!r} is empty")
    return TaskText(value)


def choices_result(control, head: ClassifierHead, probs: np.ndarray) -> tuple[dict, float]:
    """One Label Studio ``choices`` result and its score, from one row of probabilities."""
    if head.multiple:
        picked = [i for i, p in enumerate(probs) if p >= head.threshold]
        if not picked:  # always suggest something; the low score says how unsure it is
            picked = [int(np.argmax(probs))]
        # probability that the whole set is right, labels taken as independent: each suggested
        # label present, each other one absent (at a threshold other than 0.5 a label can be
        # suggested below one half, or left out above it)
        suggested = np.zeros(len(probs), dtype=bool)
        suggested[picked] = True
        score = float(np.prod(np.where(suggested, probs, 1.0 - probs)))
        if len(picked) == 1 and probs[picked[0]] < head.threshold:
            score = float(probs[picked[0]])
    else:
        picked = [int(np.argmax(probs))]
        score = float(probs[picked[0]])
    value = {"choices": [head.labels[i] for i in picked]}
    item = {
        "from_name": control.name,
        "to_name": control.to_name,
        "type": "choices",
        "value": value,
        "score": round(score, 6),
    }
    return item, score


class Predictor:
    def __init__(self, settings: Settings, registry: ModelRegistry | None = None, encoder: Encoder | None = None):
        self.settings = settings
        self.registry = registry or ModelRegistry(settings.model_dir)
        self.device = resolve_device(settings.device)
        self.base_encoder = encoder or Encoder(
            settings.encoder_path, self.device, settings.max_length, settings.inference_precision
        )
        self._encoders: dict[str, Encoder] = {}
        self._loading: dict[str, threading.Lock] = {}  # one lock per encoder path being loaded
        self._serving: dict[str, Serving] = {}
        self._warming: set[str] = set()  # projects whose version /setup started loading ahead
        # versions whose encoder failed to load here, and when: passed over for BROKEN_RETRY_S
        self._broken: dict[tuple[str, str], float] = {}
        self._lock = threading.RLock()
        log.info(
            "predictor: serving on %s in %s (INFERENCE_PRECISION=%s)",
            self.device.type, self.base_encoder.precision_tag, settings.inference_precision,
        )

    # -- versions ------------------------------------------------------------------
    #: seconds a version whose encoder would not load is passed over before it is tried again
    BROKEN_RETRY_S = 60.0

    def _broken_versions(self, project_key: str) -> frozenset[str]:
        now = time.monotonic()
        with self._lock:
            return frozenset(v for (k, v), at in self._broken.items() if k == project_key and now - at < self.BROKEN_RETRY_S)

    def _mark_broken(self, project_key: str, version: str) -> None:
        with self._lock:
            self._broken[(project_key, version)] = time.monotonic()

    def _install_loadable(self, project_key: str, loaded: LoadedHeads, serving: Serving | None) -> Serving:
        """:meth:`_install` ``loaded``; where its encoder will not load (an incomplete ``encoder/``
        folder), the next stand-in of :meth:`_readable_version`, so that one broken version costs
        a fresh worker its requests' model, not a 500 on every request."""
        tried: set[str] = set()
        while True:
            try:
                return self._install(project_key, loaded)
            except Exception:
                if loaded.encoder_path is None:
                    raise  # not the encoder's folder: our bug, a 500 says so
                log.exception("project %s: version %s does not load (its encoder); a stand-in serves", project_key,
                              loaded.version)
                self._mark_broken(project_key, loaded.version)
                tried.add(loaded.version)
                stand_in = self._readable_version(project_key, serving, frozenset(tried))
                if stand_in is None:
                    raise
                loaded = stand_in

    def unsupported_version(self, project_key: str) -> str:
        return f"{version_prefix(project_key)}-unsupported"

    def encoder_for(self, path: str | None) -> Encoder:
        if path is None:
            return self.base_encoder
        with self._lock:
            encoder = self._encoders.get(path)
            loading = self._loading.setdefault(path, threading.Lock())
        if encoder is None:
            with loading:  # requests that need the same encoder at once load it once, not once each
                with self._lock:
                    encoder = self._encoders.get(path)
                if encoder is None:
                    encoder = Encoder(path, self.device, self.settings.max_length, self.settings.inference_precision)
                    with self._lock:
                        encoder = self._encoders.setdefault(path, encoder)
        return encoder

    def _release_unused_encoders(self) -> None:
        """Drop the fine-tuned encoders no project serves any more (call with ``_lock`` held).

        Every promoted version with an encoder of its own would otherwise stay in memory in
        every web worker for good.  A request still running on a dropped encoder keeps it
        alive through its ``Serving`` until it ends."""
        used = {serving.encoder.path for serving in self._serving.values()}
        for path in [p for p in self._encoders if p not in used]:
            del self._encoders[path]
            self._loading.pop(path, None)
            log.info("predictor: released the encoder %s (no project serves it any more)", path)

    def _readable_version(self, project_key: str, serving: Serving | None,
                          skip: frozenset[str] = frozenset()) -> LoadedHeads | None:
        """The registry's current version; when it names a version that is missing or unreadable
        (a deleted folder, a corrupt meta.json), or one in ``skip`` (its encoder would not load),
        the readable version that served most recently (the registry's history), else what this
        process served, else the newest readable one, so that a broken pointer costs its requests
        a served model, not a 500.  None: the project has no readable version."""
        current = self.registry.current(project_key)
        skip = skip | self._broken_versions(project_key)
        if current in skip:
            log.warning("project %s: current version %s did not load here lately; a stand-in serves", project_key, current)
        elif current is None and not self.registry.versions(project_key):
            return None  # a new project: its cold start is due
        elif current is None:  # versions, but no pointer (removed, emptied): never a cold start over a trained model
            log.warning("project %s: no current version recorded; serving the last one that served", project_key)
        # what served last first, as the registry's history has it (the same in every process; a
        # version the gate refused, or one an operator rolled back away from, is no stand-in while
        # one that served is readable), then what this process served, then the newest readable one
        loaded = self.registry.readable_current(project_key, skip, [serving.version] if serving is not None else [])
        if loaded is not None and (other := built_on_other_base(loaded, self.settings.encoder_path, self.base_encoder.dim)):
            # BASE_MODEL changed: the project starts over with a cold start on it (a new version)
            log.warning("project %s: version %s was %s; a cold start on BASE_MODEL replaces it", project_key,
                        loaded.version, other)
            return None
        return loaded

    def ensure_version(self, project_key: str, plan: LabelingPlan) -> str:
        """The project's current version, creating the cold start (``v0``) or a version
        re-shaped to a changed label config when needed.  Cheap when nothing changed."""
        return self.ensure_serving(project_key, plan).version

    def ensure_serving(self, project_key: str, plan: LabelingPlan) -> Serving:
        """What serves ``plan`` now (see :meth:`ensure_version`): predictions use exactly this, so
        a version promoted meanwhile under an older label config never answers for the new one."""
        serving = self._current_serving(project_key)
        if serving is not None and serving.signature == plan.signature:
            return serving
        with self.registry.lock(project_key):
            loaded = self._readable_version(project_key, serving)
            if loaded is None or loaded.meta.get("plan_signature") != plan.signature:
                loaded = self._write_version_for_plan(project_key, plan, loaded)
        return self._install_loadable(project_key, loaded, serving)

    def _write_version_for_plan(self, project_key: str, plan: LabelingPlan, parent: LoadedHeads | None) -> LoadedHeads:
        encoder = self.encoder_for(parent.encoder_path if parent else None)
        return self.registry.write_plan_version(project_key, plan, parent, encoder, self.settings)

    def _install(self, project_key: str, loaded: LoadedHeads, encoder: Encoder | None = None) -> Serving:
        encoder = encoder or self.encoder_for(loaded.encoder_path)
        serving = Serving(
            version=loaded.version,
            heads=loaded.heads,
            encoder=encoder,
            signature=loaded.meta.get("plan_signature"),
            checked_at=time.monotonic(),
        )
        serving.used_at = serving.checked_at
        with self._lock:
            self._serving[project_key] = serving
            if loaded.encoder_path is not None:  # back in the cache if released while it loaded
                self._encoders.setdefault(loaded.encoder_path, encoder)
            self._forget_idle_projects(keep=project_key)
            self._release_unused_encoders()
        log.info("project %s: serving %s", project_key, loaded.version)
        return serving

    def _forget_idle_projects(self, keep: str) -> None:
        """Past ``MAX_SERVED_ENCODERS`` fine-tuned encoders, forget the projects that read one and
        were asked for least recently (call with ``_lock`` held): their next request loads their
        version again (seconds), and a worker serving many tuned projects keeps a bounded memory
        (about 90 MB an encoder in float32).  Projects on the base encoder cost only their heads."""
        cap = self.settings.max_served_encoders
        if cap <= 0:
            return
        tuned: dict[str, float] = {}  # encoder path -> the last use of any project reading it
        for key, serving in self._serving.items():
            if serving.encoder is not self.base_encoder:
                tuned[serving.encoder.path] = max(tuned.get(serving.encoder.path, 0.0), serving.used_at)
        keep_path = self._serving[keep].encoder.path if keep in self._serving else None
        for path in sorted(tuned, key=tuned.get)[: max(0, len(tuned) - cap)]:
            if path == keep_path:
                continue
            for key in [k for k, v in self._serving.items() if v.encoder.path == path and v.encoder is not self.base_encoder]:
                del self._serving[key]
                log.info("predictor: project %s forgotten until its next request (MAX_SERVED_ENCODERS=%d)", key, cap)

    def _load_in_background(self, project_key: str, version: str) -> None:
        def run() -> None:
            try:
                loaded = self.registry.load(project_key, version)
                encoder = self.encoder_for(loaded.encoder_path)  # the slow part, while the previous version serves
                # a rollback (or a newer promotion) while it loaded: the version is no longer the one to serve
                if self.registry.current(project_key) != version:
                    log.info("project %s: %s is no longer current; not serving it", project_key, version)
                    with self._lock:
                        self._release_unused_encoders()
                    return
                self._install(project_key, loaded, encoder)
            except Exception:
                log.exception("project %s: could not load version %s; keeping the previous one", project_key, version)
                self._mark_broken(project_key, version)  # tried again after BROKEN_RETRY_S, not every check
            finally:
                with self._lock:
                    serving = self._serving.get(project_key)
                    if serving is not None and serving.loading == version:
                        serving.loading = None

        threading.Thread(target=run, name=f"load-{version}", daemon=True).start()

    def _current_serving(self, project_key: str) -> Serving | None:
        """What to serve now; notices a new current version at most every
        ``version_check_interval`` seconds (one small file read)."""
        with self._lock:
            serving = self._serving.get(project_key)
        now = time.monotonic()
        if serving is not None:
            serving.used_at = now
        if serving is not None and now - serving.checked_at < self.settings.version_check_interval:
            return serving
        current = self.registry.current(project_key)
        removed = False
        if serving is not None:
            serving.checked_at = now
            if current is None or serving.loading == current:
                return serving  # (no pointer at all: keep what this process serves)
            if serving.version == current:
                if self.registry.has_meta(project_key, current):
                    return serving
                # its folder removed by hand: a worker started now serves a stand-in, and so must
                # this one, or Label Studio gets two model_versions for one project
                removed = True
        loaded = self._readable_version(project_key, serving)
        if loaded is None:
            return serving
        if serving is not None and loaded.version != current and not removed:
            return serving  # current is unreadable (or did not load lately): keep what this process serves
        if removed:
            log.warning("project %s: the folder of %s, which this worker served, is gone; %s serves",
                        project_key, current, loaded.version)
            try:
                return self._install_loadable(project_key, loaded, serving)
            except Exception:  # no stand-in loads either: what this worker holds answers still
                log.exception("project %s: no stand-in for %s loads", project_key, current)
                return serving
        if serving is None or loaded.encoder_path is None or loaded.encoder_path in self._encoders:
            return self._install_loadable(project_key, loaded, serving)  # heads only: milliseconds
        serving.loading = current
        self._load_in_background(project_key, current)
        return serving

    # -- prediction ----------------------------------------------------------------
    def setup(self, project_key: str, label_config: str) -> str:
        try:
            plan = plan_for(label_config)
        except UnsupportedConfig as exc:
            log.warning("project %s: %s", project_key, exc)
            return self.unsupported_version(project_key)
        ahead = self._version_loading_ahead(project_key, plan)
        return ahead if ahead is not None else self.ensure_version(project_key, plan)

    def _version_loading_ahead(self, project_key: str, plan: LabelingPlan) -> str | None:
        """For a project this process does not serve yet whose version reads an encoder of its own not
        loaded here (a worker just started, a project forgotten past ``MAX_SERVED_ENCODERS``): that
        version's name, with its encoder loading in the background.  Label Studio gives ``/setup``
        3 s and marks the backend "Error" past them, and a fine-tuned encoder takes seconds to load
        from a cold disk; ``/predict`` then waits for the one load under way rather than starting its
        own.  Where the label config changed since that version was made, the version re-shaped to it
        is written in the background as well (embedding the new labels needs the encoder), and until
        then ``/setup`` names the version it is made from.  None where :meth:`ensure_version` answers
        at once (heads only, or a cold start on the base encoder)."""
        with self._lock:
            if project_key in self._serving:
                return None
        loaded = self._readable_version(project_key, None)
        if loaded is None:
            return None  # a cold start: the usual path, under the lock
        with self._lock:
            if loaded.encoder_path is None or loaded.encoder_path in self._encoders:
                return None
            if project_key in self._warming:
                return loaded.version  # a /setup again while it loads: the same answer, no second load
            self._warming.add(project_key)

        def run() -> None:
            try:
                self.ensure_serving(project_key, plan)
            except Exception:
                log.exception("project %s: could not load version %s ahead of its requests", project_key, loaded.version)
            finally:
                with self._lock:
                    self._warming.discard(project_key)

        threading.Thread(target=run, name=f"setup-{loaded.version}", daemon=True).start()
        log.info("project %s: answering /setup with %s while its encoder loads", project_key, loaded.version)
        return loaded.version

    def predict(self, project_key: str, label_config: str, tasks: Sequence[Any], deadline: float | None = None) -> list[dict]:
        """One entry per task; with ``deadline`` (a ``time.perf_counter()`` value), the tasks not
        reached by then get entries without ``result`` (see ``_predict_within``)."""
        try:
            plan = plan_for(label_config)
        except UnsupportedConfig as exc:
            log.warning("project %s: empty predictions for %d tasks: %s", project_key, len(tasks), exc)
            version = self.unsupported_version(project_key)
            return [{"result": [], "score": 0.0, "model_version": version} for _ in tasks]
        serving = self.ensure_serving(project_key, plan)
        if deadline is None:
            return self.predict_with(serving, plan, tasks, project_key)
        return self._predict_within(serving, plan, tasks, project_key, deadline)

    def _predict_within(
        self, serving: Serving, plan: LabelingPlan, tasks: Sequence[Any], project_key: str, deadline: float
    ) -> list[dict]:
        """Results for as many of ``tasks`` as there is time for until ``deadline``, in runs sized
        by the pace so far (the first, ``FIRST_RUN_BATCHES`` batches, always runs); each task past it gets
        an entry without ``result``, which Label Studio skips without storing anything, so the
        next "Retrieve predictions" asks for those tasks again (a batch that cannot finish within
        Label Studio's 100 s stores nothing at all)."""
        started = time.perf_counter()
        out: list[dict] = []
        size = FIRST_RUN_BATCHES * self.settings.batch_size
        while size > 0 and len(out) < len(tasks):
            out.extend(self.predict_with(serving, plan, tasks[len(out):len(out) + size], project_key))
            now = time.perf_counter()
            # the next run may take half of what is left at the pace so far (later texts may be longer)
            size = int(len(out) / max(now - started, 1e-6) * (deadline - now) * 0.5)
        left = len(tasks) - len(out)
        if left:
            message = (f"not predicted in time: {len(out)} of {len(tasks)} tasks were, in "
                       f"{time.perf_counter() - started:.1f} s (PREDICT_TIME_BUDGET={self.settings.predict_time_budget:g}); "
                       "retrieve predictions again for the rest")
            log.warning("project %s: %d of %d tasks %s", project_key, left, len(tasks), message)
            out.extend({"model_version": serving.version, "error": message} for _ in range(left))
        return out

    def predict_with(
        self, serving: Serving, plan: LabelingPlan, tasks: Sequence[Any], project_key: str = "", keep: dict | None = None
    ) -> list[dict]:
        """Results for ``tasks``; ``keep``, when given, receives what the refresh saves for ranking:
        ``embeddings`` (one row per text), ``texts`` (the text of each row: its first ``max_text_chars``
        characters), ``slot`` ((field, task index) -> row), ``probabilities`` (control -> one row
        or None per task) and ``scored`` (per task: whether a control gave it a score).  For ``keep``
        the texts of untrained Labels controls are embedded too: a project with nothing trained yet
        still gets a pool to choose its first batch from."""
        started = time.perf_counter()
        controls = [c for c in plan.controls if c.kind == CHOICES and isinstance(serving.heads.get(c.name), ClassifierHead)]
        # Labels controls whose token head was trained; an untrained one finds no spans
        token_controls = [
            c for c in plan.controls
            if c.kind == LABELS and isinstance(serving.heads.get(c.name), TokenHead) and serving.heads[c.name].trained
        ]
        # one encoder pass over every distinct (field, task) text
        read_by = controls + token_controls + ([c for c in plan.controls if c.kind == LABELS] if keep is not None else [])
        fields = sorted({c.field for c in read_by})
        texts: list[str] = []
        slot: dict[tuple[str, int], int] = {}
        problems: dict[int, str] = {}
        for i, task in enumerate(tasks):
            for data_field in fields:
                read = read_text(task, data_field)
                if read.text is None:
                    problems.setdefault(i, read.problem or "unreadable")
                    continue
                # a prefix: span offsets found in it hold for the whole text
                text = clip_visible(read.text, self.settings.max_text_chars, whole_words=True)
                if reads_nothing(serving.encoder, text):
                    problems.setdefault(i, f"task data field {data_field!r} holds no character the model reads")
                    continue
                slot[(data_field, i)] = len(texts)
                texts.append(text)
        token_rows: dict[int, list] = {}
        for control in token_controls:
            for i in range(len(tasks)):
                if (control.field, i) in slot:
                    token_rows.setdefault(slot[(control.field, i)], []).append((control, serving.heads[control.name]))
        # one encoder pass per text: texts read by a token head give their pooled embedding too
        embeddings, spans = encode_with_tokens(serving.encoder, texts, token_rows, self.settings.batch_size)
        probabilities = {}
        for control in controls:
            rows = [slot.get((control.field, i), -1) for i in range(len(tasks))]
            valid = [r for r in rows if r >= 0]
            probs = serving.heads[control.name].probabilities(embeddings[valid]) if valid else np.zeros((0, 0))
            lookup = {r: probs[k] for k, r in enumerate(valid)}
            # a row that is not finite (an overflow in half precision) suggests nothing: NaN is not JSON
            probabilities[control.name] = [
                lookup[r] if r >= 0 and np.all(np.isfinite(lookup[r])) else None for r in rows
            ]
        out, scored = [], []
        for i in range(len(tasks)):
            result, scores = [], []
            items, chosen = [], {}
            for control in controls:
                probs = probabilities[control.name][i]
                if probs is None:
                    continue
                head = serving.heads[control.name]
                item, score = choices_result(control, head, probs)
                names = {label.value: label.name for label in control.labels}
                chosen[control.name] = set(item["value"]["choices"]) | {names.get(v, v) for v in item["value"]["choices"]}
                # the task's score under SCORE_MODE (the item keeps its calibrated confidence)
                items.append((control, item, result_score(self.settings.score_mode, probs, head.multiple, head.threshold,
                                                          score)))
            # a control Label Studio would hide, given the choices predicted, gets no result and does not
            # set the task's score: the annotator never sees that question
            shown = shown_controls(plan.controls, chosen)
            for control, item, score in items:
                if control.name in shown:
                    result.append(item)
                    scores.append(score)
            for control in token_controls:
                found = spans.get((control.name, slot.get((control.field, i), -1)))
                if found is not None and control.name in shown:
                    result.extend(found[0])
                    scores.append(found[1])
            if i in problems and not result:
                log.info("project %s: task %s gets an empty prediction: %s", project_key, _task_id(tasks[i]), problems[i])
            scored.append(bool(scores))
            out.append(
                {
                    "result": result,
                    "score": round(min(scores), 6) if scores else 0.0,
                    "model_version": serving.version,
                }
            )
        if keep is not None:
            keep.update(embeddings=embeddings, texts=texts, slot=slot, probabilities=probabilities, scored=scored)
        log.info(
            "project %s version %s: predicted %d tasks in %.1f ms",
            project_key,
            serving.version,
            len(tasks),
            (time.perf_counter() - started) * 1000,
        )
        return out


#: the first run of a call under PREDICT_TIME_BUDGET, in batches: a run pads each batch to its longest
#: text among texts sorted by length, so one of a single batch cost a 2,000-task call 0.3 s (8%)
FIRST_RUN_BATCHES = 8


def _task_id(task: Any) -> Any:
    return task.get("id") if isinstance(task, dict) else None
