"""The NER part of a fine-tuning job (``finetune.FineTuneJob``).

A job trains every ``<Labels>`` control that has labels and carries the others.
Training a token head well needs the encoder's token states tuned, so in a job with
NER labels the encoder belongs to NER: it is fine-tuned with the token heads (the
``ner-full`` candidate), and the classification heads are refit on the new encoder's
embeddings with the fast head (``trainer.fit_head``, seconds), since the rows they
learned belong to the old encoder.  ``TRAIN_MODE=frozen`` (and ``auto``, beside the
full candidate) also builds ``ner-frozen``: token heads fit on the current encoder's
frozen token states, classification heads from the job's fast head, no new encoder.
The evaluation slice decides between candidates and the gate compares the winner with
the current version, exactly as for classification; a Labels control's figure is its
entity-level F1 (exact match of start, end and label).

In a job without NER labels, a project whose token heads are trained keeps its
encoder (no classification fine-tune): changing it would leave the token heads on
states they were not trained on, and without labels they cannot be retrained.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .labeling import LABELS, LabelingPlan
from .model import ClassifierHead, zero_shot_head
from .ner import TokenData, TokenHead, evaluate_tokens, fine_tune_tokens, fit_token_head, token_head_for
from .spans import Span, region_labels, resolve_span, span_scores
from .trainer import evaluate, fit_head

if TYPE_CHECKING:
    from .finetune import FineTuneJob
    from .model import Encoder
    from .settings import Settings
    from .trainer import TrainingArguments

log = logging.getLogger(__name__)


@dataclass
class TokenSplit:
    train: TokenData
    held: TokenData


def spans_of(text: str, items: list[dict], labels: tuple[str, ...], to_name: str | None = None) -> tuple[list[Span], dict]:
    """Character spans of a task's result items for one Labels control.

    Each item's first label that the control still has is taken (a region carrying two
    labels trains as the first); items whose offsets and text do not match the task
    text are resolved by ``spans.resolve_span``, else counted ``unresolved``, as is a
    region whose ``value`` or ``labels`` is malformed; a region with none of the control's
    labels (renamed or removed since) is counted ``unknown_label``; a region drawn on another
    object than ``to_name`` (the control pointed at another ``<Text>`` when it was made) is
    counted ``other_text``: its offsets and words belong to that text, not this one.  A region
    of no characters (``start == end``, no text: a click without a drag) marks nothing and is
    counted ``empty``; the task's other regions still train.
    """
    spans: list[Span] = []
    counts = {"unresolved": 0, "unknown_label": 0, "other_text": 0, "empty": 0}
    for item in items:
        if to_name is not None and isinstance(item, dict) and item.get("to_name") not in (None, to_name):
            counts["other_text"] += 1
            continue
        value = item.get("value") if isinstance(item, dict) else None
        if not isinstance(value, dict):
            counts["unresolved"] += 1
            continue
        names = region_labels(value)
        if value.get("labels") and not names:
            counts["unresolved"] += 1
            continue
        label = next((name for name in names if name in labels), None)
        if label is None:
            counts["unknown_label"] += bool(names)
            continue
        start, end = value.get("start"), value.get("end")
        if type(start) is int and start == end and not value.get("text"):
            counts["empty"] += 1
            continue
        where = resolve_span(text, value)
        if where is None:
            counts["unresolved"] += 1
            continue
        spans.append((where[0], where[1], label))
    return spans, counts


def _bounded(rows: list, limit: int, seed: int) -> list:
    """At most ``limit`` rows: the newest half (highest task ids), then a replay sample."""
    if len(rows) <= limit:
        return rows
    ordered = sorted(rows, key=lambda row: row[0], reverse=True)
    newest, older = ordered[: limit // 2], ordered[limit // 2 :]
    rng = np.random.default_rng(seed)
    replay = [older[i] for i in sorted(rng.choice(len(older), limit - len(newest), replace=False))]
    return sorted(newest + replay, key=lambda row: row[0])


def token_data(
    store,
    project_key: str,
    plan: LabelingPlan,
    heads: dict,
    settings: "Settings",
    args: "TrainingArguments",
    encoder: "Encoder",
) -> dict[str, TokenSplit]:
    """Train/evaluation examples of every Labels control that has at least one span.

    Every task annotated since the control's first region is an example (one with no
    span of the control is a negative; annotations made before anyone labeled an entity
    of it, as under an earlier config without it, are not); a task with a region that
    cannot be placed in its text, whose label the control no longer has, or that was drawn on
    another ``<Text>`` than the control's (its ``toName`` changed since), is left out whole,
    since its entity would train as ``O`` (or be placed at a chance match of its words).  The evaluation slice is the same hash of the task id as for classification.
    A control without a head in ``heads`` (a version older than token heads) gets an
    untrained one, added to ``heads``.
    """
    from .finetune import in_eval_slice

    out: dict[str, TokenSplit] = {}
    for control in plan.controls:
        if control.kind != LABELS:
            continue
        rows = store.annotation_results(project_key, control.name, field=control.field, include_empty="since_first")
        examples, problems = [], {"unresolved": 0, "unknown_label": 0, "other_text": 0, "empty": 0, "no_text": 0}
        for task_id, text, items in rows:
            if not text:
                problems["no_text"] += 1
                continue
            spans, counts = spans_of(text, items, control.values, control.to_name)
            for key, n in counts.items():
                problems[key] += n
            if counts["unresolved"] or counts["unknown_label"] or counts["other_text"]:
                continue
            examples.append((task_id, text, spans))
        for key, n in problems.items():
            if n:
                log.info("project %s control %s: %d %s region(s) or task(s) left out of training", project_key,
                         control.name, n, key.replace("_", " "))
        if not any(spans for _, _, spans in examples):
            continue  # no entity labeled yet: nothing to learn, the control is carried
        if not isinstance(heads.get(control.name), TokenHead):
            heads[control.name] = token_head_for(control, None, encoder.dim, settings.encoder_path)
        labels = heads[control.name].labels
        held = [e for e in examples if in_eval_slice(e[0], settings.eval_share)]
        judged = {text for _, text, _ in held}  # a duplicate task's text the slice holds is not trained on
        train = [e for e in examples if not in_eval_slice(e[0], settings.eval_share) and e[1] not in judged]
        train = _bounded(train, args.max_train_examples, args.seed)

        def as_data(part: list) -> TokenData:
            return TokenData(control.name, list(labels), [t for _, t, _ in part], [s for _, _, s in part],
                             [i for i, _, _ in part])

        if train and any(spans for _, _, spans in train):
            out[control.name] = TokenSplit(as_data(train), as_data(held))
    return out


def encoder_is_taken(heads: dict, token_splits: dict) -> bool:
    """Whether the encoder may not be fine-tuned for classification in this job."""
    return bool(token_splits) or any(isinstance(h, TokenHead) and h.trained for h in heads.values())


def _token_figures(encoder: "Encoder", heads: dict, token_splits: dict[str, TokenSplit], batch_size: int) -> dict:
    """Each Labels control's slice figures with ``heads`` read through ``encoder``; a control
    without a token head finds nothing, as it does when serving."""
    return {
        name: evaluate_tokens(encoder, heads[name], split.held, batch_size)
        if isinstance(heads.get(name), TokenHead)
        else span_scores(split.held.spans, [[] for _ in split.held.texts])
        for name, split in token_splits.items()
        if len(split.held)
    }


def version_figures(classification: dict | None, encoder: "Encoder", heads: dict,
                    token_splits: dict[str, TokenSplit], batch_size: int) -> dict:
    """A version's slice figures over all controls: ``classification`` (measured by the job)
    with its token heads read through ``encoder``."""
    return _combine(classification, _token_figures(encoder, heads, token_splits, batch_size))


def _combine(classification: dict | None, tokens: dict) -> dict:
    controls = dict((classification or {}).get("controls") or {})
    controls.update(tokens)
    scores = [m["primary"] for m in controls.values()]
    return {"score": float(np.mean(scores)) if scores else None, "controls": controls}


def token_candidates(
    job: "FineTuneJob",
    plan: LabelingPlan,
    encoder: "Encoder",
    start_heads: dict,
    splits: dict,
    token_splits: dict[str, TokenSplit],
    candidates: dict,
    figures: dict,
) -> tuple[dict, dict]:
    """The job's candidates and slice figures once Labels controls have labels.

    ``candidates``/``figures`` are the classification part the job built on the current
    encoder (its ``frozen`` fast heads are reused by ``ner-frozen``); what comes back
    replaces them: ``current`` and each NER candidate, over all controls.
    """
    settings, args = job.settings, job.args
    batch = settings.batch_size
    out_figures = {"current": _combine(figures.get("current"), _token_figures(encoder, start_heads, token_splits, batch))}
    out: dict = {}
    data = {name: split.train for name, split in token_splits.items()}
    mode = args.mode
    if mode in ("frozen", "auto") and "frozen" in candidates:
        heads = dict(candidates["frozen"][0])
        report = {"classification": candidates["frozen"][2], "ner": {}}
        for name, train in data.items():
            heads[name], report["ner"][name] = fit_token_head(encoder, start_heads[name], train, args)
        job.progress({"stage": "ner-frozen"})
        out["ner-frozen"] = (heads, None, report)
        out_figures["ner-frozen"] = _combine(figures.get("frozen"), _token_figures(encoder, heads, token_splits, batch))
    if mode in ("full", "auto"):
        student, token_heads, report = fine_tune_tokens(
            encoder, {name: start_heads[name] for name in data}, list(data.values()), args, job.progress
        )
        heads = dict(start_heads)
        heads.update(token_heads)
        served = student.reading_as(encoder)  # fitted and judged on what the web workers will compute
        refit, classification = _refit_classification(job, plan, served, heads, splits)
        report = {"ner": report, "classification_refit": refit}
        out["ner-full"] = (heads, student, report)
        out_figures["ner-full"] = _combine(classification, _token_figures(served, heads, token_splits, batch))
    out = {name: out[name] for name in ("ner-full", "ner-frozen") if name in out}  # a tie goes to the full one
    for name, split in token_splits.items():
        log.info("control %s: %d training texts (%d entities), %d in the evaluation slice", name, len(split.train),
                 split.train.entities, len(split.held))
    return out, out_figures


def _refit_classification(job: "FineTuneJob", plan: LabelingPlan, student: "Encoder", heads: dict, splits: dict):
    """Classification heads moved onto the NER-tuned encoder (``heads`` is updated).

    Controls with labels: the fast head refit on the new encoder's embeddings, warm from
    the current rows.  Controls still zero-shot: their label rows embedded again by the
    new encoder.  Returns the fit reports and the slice figures.
    """
    settings, args = job.settings, job.args
    reports, per_control = {}, {}
    for control in plan.controls:
        head = heads.get(control.name)
        if not isinstance(head, ClassifierHead):
            continue
        split = splits.get(control.name)
        if split is not None:
            train = student.encode(split.train.texts, settings.batch_size)
            heads[control.name], reports[control.name] = fit_head(train, split.train, head, args.seed)
            if len(split.held):
                probs = heads[control.name].probabilities(student.encode(split.held.texts, settings.batch_size))
                per_control[control.name] = evaluate(probs, split.held, heads[control.name])
        elif not head.trained:
            heads[control.name] = zero_shot_head(control, student, settings.zero_shot_template,
                                                 settings.zero_shot_temperature, settings.multi_label_threshold)
            reports[control.name] = {"zero_shot": "label rows embedded by the new encoder"}
        else:
            log.warning("control %s: trained head without labels now; it is carried onto the new encoder as it is",
                        control.name)
    job.progress({"stage": "classification-refit"})
    scores = [m["primary"] for m in per_control.values()]
    return reports, {"score": float(np.mean(scores)) if scores else None, "controls": per_control}
