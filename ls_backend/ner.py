"""Labels over Text (NER): the token head, prediction over windows, training, evaluation.

A ``<Labels>`` control's head is a :class:`TokenHead`: a linear layer over the
encoder's last hidden states with one row per BIO tag (``O``, ``B-X``, ``I-X`` for
each label ``X``), read through a softmax.  It sits in the version beside the
classification heads, on the same encoder (see the README, "Named entities").

Prediction tokenizes each text once, without truncation, with the fast tokenizer's
offset mapping; texts longer than the encoder's window are read in overlapping
windows and every token takes its tag from the window that sees it with the most
context (``spans.window_owners``).  Tags become character spans through the same
offsets (``spans.decode``).  Training turns annotation spans into tags through those
offsets too (``spans.token_tags``), so a span the model learned comes back exactly.

A head that was never trained predicts nothing: no zero-shot spans.  The exception is
a ``BASE_MODEL`` that is itself a token-classification model whose tags name every
label of the control; its classifier then becomes the cold-start head.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from .precision import TrainingStep
from .spans import IGNORE, FoundSpan, Span, TaggingReport, bio_tags, decode, label_index_of, span_scores, token_tags, window_owners, windows
from .text import readable, utf8_safe

if TYPE_CHECKING:
    from .labeling import ControlSpec
    from .model import Encoder
    from .trainer import TrainingArguments

log = logging.getLogger(__name__)

Progress = Callable[[dict], None]

#: Bias given to the rows of labels added to a trained head: far below ``O``, so a new
#: label is never predicted before it has been trained.
NEW_LABEL_BIAS = -10.0
#: At most this many token states feed the frozen token head's full-batch fit (each costs
#: ``dim`` floats twice over, float32 and the solver's float64): 250,000 tokens of a 384-wide
#: encoder are about 1.1 GB; beyond it windows are sampled.
MAX_FIT_TOKENS = 250_000


@dataclass
class TokenHead:
    """``p(tag | token) = softmax(W h + b)`` over the encoder's last hidden state ``h``."""

    labels: list[str]  # result values (aliases where set), in the control's order
    weight: np.ndarray  # (tags, dim), tags = bio_tags(labels)
    bias: np.ndarray  # (tags,)
    trained: bool = False  # False: predicts no spans
    untrained_labels: list[str] = field(default_factory=list)  # labels added since the head was trained
    source: str = "new"  # new | trained | base-model
    # labels removed from the config since the head was trained, with their B/I rows: still scored,
    # and what they win goes to ``O`` (``fold``), until a job trains the head without them
    retired: list[str] = field(default_factory=list)
    retired_weight: np.ndarray | None = None  # (2 x retired, dim)
    retired_bias: np.ndarray | None = None

    @property
    def tags(self) -> list[str]:
        return bio_tags(self.labels)

    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Every row the head scores: its tags', then its retired labels'."""
        if not self.retired:
            return self.weight, self.bias
        return np.concatenate([self.weight, self.retired_weight]), np.concatenate([self.bias, self.retired_bias])

    def fold(self, probabilities: np.ndarray) -> np.ndarray:
        """Probabilities over :meth:`rows` as probabilities over the tags: a retired label's go to
        ``O``.  Dropped with its rows, a removed label's share went to whichever label came next (a
        removed ORG made every organisation a confident LOC)."""
        n = len(self.tags)
        if probabilities.shape[-1] == n:
            return probabilities
        out = probabilities[..., :n].copy()
        out[..., 0] += probabilities[..., n:].sum(axis=-1)
        return out

    def probabilities(self, states: np.ndarray) -> np.ndarray:
        weight, bias = self.rows()
        logits = states @ weight.T + bias
        logits = logits - logits.max(axis=-1, keepdims=True)
        exp = np.exp(logits)
        return self.fold(exp / exp.sum(axis=-1, keepdims=True))

    def to_meta(self) -> dict:
        return {
            "head": "token",
            "labels": list(self.labels),
            "tags": self.tags,
            "trained": self.trained,
            "untrained_labels": list(self.untrained_labels),
            "source": self.source,
            **({"retired": list(self.retired)} if self.retired else {}),
        }

    @classmethod
    def from_meta(cls, meta: dict, weight: np.ndarray, bias: np.ndarray,
                  retired_weight: np.ndarray | None = None, retired_bias: np.ndarray | None = None) -> "TokenHead":
        retired = list(meta.get("retired", [])) if retired_weight is not None and retired_bias is not None else []
        head = cls(
            labels=list(meta["labels"]),
            weight=np.asarray(weight, dtype=np.float32),
            bias=np.asarray(bias, dtype=np.float32),
            trained=bool(meta.get("trained", False)),
            untrained_labels=list(meta.get("untrained_labels", [])),
            source=str(meta.get("source", "trained" if meta.get("trained") else "new")),
            retired=retired,
            retired_weight=np.asarray(retired_weight, dtype=np.float32) if retired else None,
            retired_bias=np.asarray(retired_bias, dtype=np.float32) if retired else None,
        )
        if retired and head.retired_weight.shape[0] != 2 * len(retired):
            raise ValueError(f"token head has {head.retired_weight.shape[0]} rows for {len(retired)} retired labels")
        if meta.get("tags") and list(meta["tags"]) != head.tags:
            raise ValueError(f"token head tags {meta['tags']} do not follow its labels {head.labels}")
        if head.weight.shape[0] != len(head.tags) or head.bias.shape != (len(head.tags),):
            raise ValueError(f"token head has {head.weight.shape[0]} rows for {len(head.tags)} tags")
        return head


def is_token_head(head: object) -> bool:
    return isinstance(head, TokenHead)


def new_token_head(labels: Sequence[str], dim: int) -> TokenHead:
    tags = len(bio_tags(labels))
    return TokenHead(list(labels), np.zeros((tags, dim), np.float32), np.zeros(tags, np.float32))


def pretrained_token_head(control: "ControlSpec", encoder_path: str | None, dim: int) -> TokenHead | None:
    """The classifier of a token-classification ``BASE_MODEL`` whose IOB tags name every
    label of ``control`` (``B-X``/``I-X``, ``O``), re-ordered to our tags; else None."""
    if not encoder_path:
        return None
    folder = Path(encoder_path)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not any(str(a).endswith("ForTokenClassification") for a in config.get("architectures") or []):
        return None
    id2label = {int(k): str(v) for k, v in (config.get("id2label") or {}).items()}
    index = {name.upper(): i for i, name in id2label.items()}
    wanted = bio_tags(control.values)
    rows = [index.get(tag.upper()) for tag in wanted]
    if any(row is None for row in rows):
        return None
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        return None
    from safetensors.numpy import load_file

    tensors: dict[str, np.ndarray] = {}
    for path in weights:
        tensors.update(load_file(str(path)))
    weight, bias = tensors.get("classifier.weight"), tensors.get("classifier.bias")
    if weight is None or bias is None or weight.shape[1] != dim:
        return None
    log.info("control %s: cold-start token head from the token-classification model %s", control.name, encoder_path)
    return TokenHead(
        labels=list(control.values),
        weight=np.asarray(weight[rows], np.float32),
        bias=np.asarray(bias[rows], np.float32),
        trained=True,
        source="base-model",
    )


def token_head_for(control: "ControlSpec", previous: object, dim: int, encoder_path: str | None = None) -> TokenHead:
    """The head of a Labels control for a (new or changed) label config.

    Rows of tags whose label is still there are kept; a label new to a trained head gets
    zero rows with a bias far below ``O`` (never predicted until trained); a trained head's removed
    labels keep their rows as retired ones (what they win goes to ``O``; a label that comes back
    gets them again).  A control without a previous head starts untrained (or from a
    token-classification ``BASE_MODEL``, see :func:`pretrained_token_head`).
    """
    values = list(control.values)
    if not isinstance(previous, TokenHead) or previous.weight.shape[1] != dim:
        return pretrained_token_head(control, encoder_path, dim) or new_token_head(values, dim)
    if previous.labels == values:
        return previous
    every_weight, every_bias = previous.rows()
    old = {tag: i for i, tag in enumerate(previous.tags + bio_tags(previous.retired)[1:])}
    floor = float(previous.bias[0]) + NEW_LABEL_BIAS if previous.trained else 0.0
    weight, bias = [], []
    for tag in bio_tags(values):
        if tag in old:
            weight.append(every_weight[old[tag]])
            bias.append(every_bias[old[tag]])
        else:
            weight.append(np.zeros(dim, np.float32))
            bias.append(floor)
    kept = [label for label in previous.untrained_labels if label in values]
    added = [label for label in values if label not in previous.labels and label not in previous.retired]
    retired = [label for label in previous.labels + previous.retired
               if label not in values and label not in previous.untrained_labels] if previous.trained else []
    rows = [old[tag] for tag in bio_tags(retired)[1:]]
    return TokenHead(
        labels=values,
        weight=np.asarray(weight, np.float32),
        bias=np.asarray(bias, np.float32),
        trained=previous.trained,
        untrained_labels=kept + added if previous.trained else [],
        source=previous.source,
        retired=retired,
        retired_weight=every_weight[rows] if retired else None,
        retired_bias=every_bias[rows] if retired else None,
    )


# -- tokenization and windows ---------------------------------------------------------------
@dataclass(frozen=True)
class Tokenized:
    ids: list[int]
    offsets: list[tuple[int, int]]
    words: list[int | None] | None = None  # the word of each token (the fast tokenizer's word_ids)


def tokenize(tokenizer, texts: Sequence[str]) -> list[Tokenized]:
    """Whole texts, no special tokens, no truncation, with character offsets and words."""
    if not texts:
        return []
    read = [readable(tokenizer, utf8_safe(t)) for t in texts]
    out = tokenizer(read, add_special_tokens=False, return_offsets_mapping=True, truncation=False, verbose=False)
    found = []
    for i, (ids, offsets) in enumerate(zip(out["input_ids"], out["offset_mapping"])):
        try:
            words = list(out.word_ids(i))
        except (ValueError, AttributeError):  # a slow tokenizer: no word ids, decoded token by token
            words = None
        found.append(Tokenized(list(ids), [(int(a), int(b)) for a, b in offsets], words))
    return found


def special_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the model expects before and after a single sequence."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    framed = tokenizer("a", add_special_tokens=True)["input_ids"]
    for at in range(len(framed) - len(plain) + 1):
        if framed[at : at + len(plain)] == plain:
            return list(framed[:at]), list(framed[at + len(plain) :])
    return [], []


def window_size(tokenizer, max_length: int) -> int:
    prefix, suffix = special_frame(tokenizer)
    return max(1, max_length - len(prefix) - len(suffix))


def _pad_batch(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


@dataclass
class TokenRun:
    """What one windowed pass over some texts gives."""

    pooled: np.ndarray  # (texts, dim): the first window's mean-pooled, unit-length embedding
    probabilities: list[list[np.ndarray]]  # [head][text] -> (tokens, tags)


def run_windows(
    encoder: "Encoder", tokenized: Sequence[Tokenized], heads: Sequence[TokenHead], batch_size: int = 32
) -> TokenRun:
    """Tag probabilities of every token of every text for each head, in one encoder pass.

    Each text is cut into windows of the encoder's length (special tokens included)
    that overlap by a quarter; windows of all texts are sorted by length and batched.
    The first window of a text is exactly what classification reads (the text
    truncated to the same length), so its pooled embedding serves the Choices heads.
    """
    prefix, suffix = special_frame(encoder.tokenizer)
    size = max(1, encoder.max_length - len(prefix) - len(suffix))
    pad = encoder.tokenizer.pad_token_id or 0
    plans = [windows(len(t.ids), size) for t in tokenized]
    items = [(i, w, prefix + tokenized[i].ids[a:b] + suffix) for i, plan in enumerate(plans) for w, (a, b) in enumerate(plan)]
    found: dict[tuple[int, int], np.ndarray] = {}
    pooled = np.zeros((len(tokenized), encoder.dim), dtype=np.float32)
    device = encoder.device
    rows = [h.rows() for h in heads]  # (a head's retired labels' rows too: ``TokenHead.fold``)
    if heads:
        weight = torch.from_numpy(np.concatenate([w for w, _ in rows]).astype(np.float32)).to(device)
        bias = torch.from_numpy(np.concatenate([b for _, b in rows]).astype(np.float32)).to(device)
    cuts = np.cumsum([0] + [len(b) for _, b in rows])
    order = sorted(range(len(items)), key=lambda k: len(items[k][2]))
    with encoder.lock, torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = [items[k] for k in order[start : start + batch_size]]
            ids, mask = _pad_batch([seq for _, _, seq in chunk], pad)
            ids, mask = ids.to(device), mask.to(device)
            with encoder.autocast():
                hidden = encoder.model(input_ids=ids, attention_mask=mask).last_hidden_state
            hidden = hidden.float()
            first = [r for r, (_, w, _) in enumerate(chunk) if w == 0]
            if first:
                m = mask[first].unsqueeze(-1).to(hidden.dtype)
                mean = (hidden[first] * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
                vectors = torch.nn.functional.normalize(mean, dim=-1).cpu().numpy()
                for r, vector in zip(first, vectors):
                    pooled[chunk[r][0]] = vector
            if not heads:
                continue
            logits = (hidden @ weight.T + bias).cpu().numpy()
            for r, (i, w, seq) in enumerate(chunk):
                found[(i, w)] = logits[r, len(prefix) : len(seq) - len(suffix)]
    per_head: list[list[np.ndarray]] = [[] for _ in heads]
    for i, plan in enumerate(plans if heads else []):
        n = len(tokenized[i].ids)
        if len(plan) == 1:
            merged = found[(i, 0)]
        else:
            owners = np.asarray(window_owners(n, plan), dtype=np.int64).reshape(n, 2)
            merged = np.empty((n, int(cuts[-1])), dtype=np.float32)
            for w in range(len(plan)):
                rows = np.nonzero(owners[:, 0] == w)[0]
                merged[rows] = found[(i, w)][owners[rows, 1]]
        for h in range(len(heads)):
            part = merged[:, cuts[h] : cuts[h + 1]]
            part = part - part.max(axis=-1, keepdims=True) if len(part) else part
            exp = np.exp(part)
            per_head[h].append(heads[h].fold(exp / exp.sum(axis=-1, keepdims=True)) if len(part) else heads[h].fold(exp))
    return TokenRun(pooled=pooled, probabilities=per_head)


def served_probabilities(probs: np.ndarray, head: TokenHead) -> np.ndarray:
    """The tag probabilities a prediction reads: what the labels added since the head was trained
    (``untrained_labels``) win goes to ``O``.  Their rows start far below ``O``, but the trained
    ``O`` row's weights can still push ``O`` under them on a token that looks like an entity, and a
    renamed label would then be predicted before any job trained it; spread over the other labels
    instead, their share made the next label win, surer than before."""
    if not head.untrained_labels or not len(probs):
        return probs
    untrained = set(head.untrained_labels)
    drop = np.array([label_index_of(tag) is not None and head.labels[label_index_of(tag)] in untrained
                     for tag in range(probs.shape[-1])])
    out = np.where(drop, 0.0, probs)
    out[..., 0] += probs[..., drop].sum(axis=-1)
    return out


def spans_from_probabilities(text: str, tokenized: Tokenized, probs: np.ndarray, head: TokenHead) -> list[FoundSpan]:
    """Spans from a head's tag probabilities: none from an untrained head, nor of a label no job
    has trained yet (:func:`served_probabilities`)."""
    if not head.trained or not len(probs) or set(head.labels) <= set(head.untrained_labels):
        return []
    probs = served_probabilities(probs, head)
    tags = probs.argmax(axis=-1)
    chosen = probs[np.arange(len(tags)), tags]
    return decode(text, tokenized.offsets, tags.tolist(), head.labels, chosen.tolist(), tokenized.words)


def control_score(found: Sequence[FoundSpan], probs: np.ndarray) -> float:
    """How sure the head is about one text: its least sure span, or when it found none,
    its least sure ``O`` (the probability that the riskiest token is outside any entity)."""
    if found:
        return float(min(span.score for span in found))
    return float(probs[:, 0].min()) if len(probs) else 1.0


def labels_results(control: "ControlSpec", text: str, found: Sequence[FoundSpan]) -> list[dict]:
    return [
        {
            "from_name": control.name,
            "to_name": control.to_name,
            "type": "labels",
            "value": {"start": s.start, "end": s.end, "text": text[s.start : s.end], "labels": [s.label]},
            "score": round(s.score, 6),
        }
        for s in found
    ]


def predict_spans(
    encoder: "Encoder", head: TokenHead, texts: Sequence[str], batch_size: int = 32
) -> list[list[FoundSpan]]:
    """Spans found in each text (none by an untrained head)."""
    if not head.trained:
        return [[] for _ in texts]
    tokenized = tokenize(encoder.tokenizer, texts)
    run = run_windows(encoder, tokenized, [head], batch_size)
    return [spans_from_probabilities(t, tok, p, head) for t, tok, p in zip(texts, tokenized, run.probabilities[0])]


def encode_with_tokens(
    encoder: "Encoder",
    texts: Sequence[str],
    token_rows: dict[int, list[tuple["ControlSpec", TokenHead]]],
    batch_size: int = 32,
) -> tuple[np.ndarray, dict[tuple[str, int], tuple[list[dict], float]]]:
    """Pooled embeddings of every text, and the Labels results of the texts that token
    controls read (``token_rows``: row -> its controls and heads), from one encoder pass
    per text: those texts' first windows give their pooled embeddings."""
    embeddings = np.zeros((len(texts), encoder.dim), dtype=np.float32)
    results: dict[tuple[str, int], tuple[list[dict], float]] = {}
    tagged = sorted(token_rows)
    plain = [r for r in range(len(texts)) if r not in token_rows]
    if plain:
        embeddings[plain] = encoder.encode([texts[r] for r in plain], batch_size)
    if not tagged:
        return embeddings, results
    heads: list[TokenHead] = []
    for r in tagged:
        for _, head in token_rows[r]:
            if not any(head is h for h in heads):
                heads.append(head)
    tokenized = tokenize(encoder.tokenizer, [texts[r] for r in tagged])
    run = run_windows(encoder, tokenized, heads, batch_size)
    embeddings[tagged] = run.pooled
    for k, r in enumerate(tagged):
        for control, head in token_rows[r]:
            probs = run.probabilities[next(h for h, x in enumerate(heads) if x is head)][k]
            if not np.all(np.isfinite(probs)):  # an overflow in half precision: nothing to suggest (NaN is not JSON)
                log.warning("%s: tag probabilities that are not finite for one text; no regions suggested", control.name)
                continue
            probs = served_probabilities(probs, head)
            found = spans_from_probabilities(texts[r], tokenized[k], probs, head)
            results[(control.name, r)] = (labels_results(control, texts[r], found), control_score(found, probs))
    return embeddings, results


# -- training data -------------------------------------------------------------------------
@dataclass
class TokenData:
    """Training (or evaluation) examples of one Labels control."""

    name: str
    labels: list[str]  # the head's label order
    texts: list[str]
    spans: list[list[Span]]  # character spans per text; [] = a text with no entity (a negative)
    task_ids: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def entities(self) -> int:
        return sum(len(s) for s in self.spans)


def training_windows(
    tokenizer, data: TokenData, max_length: int
) -> tuple[list[tuple[list[int], list[int]]], TaggingReport]:
    """``(input ids, tag ids)`` windows of every text (special tokens tagged ``IGNORE``)."""
    prefix, suffix = special_frame(tokenizer)
    size = max(1, max_length - len(prefix) - len(suffix))
    report = TaggingReport()
    out = []
    for tokenized, spans in zip(tokenize(tokenizer, data.texts), data.spans):
        tags, part = token_tags(tokenized.offsets, spans, data.labels)
        report.add(part)
        if not tokenized.ids:
            continue
        for a, b in windows(len(tokenized.ids), size):
            out.append(
                (
                    prefix + tokenized.ids[a:b] + suffix,
                    [IGNORE] * len(prefix) + tags[a:b] + [IGNORE] * len(suffix),
                )
            )
    return out, report


def _log_report(name: str, report: TaggingReport) -> None:
    if report.snapped:
        log.info("control %s: %d of %d span(s) cut a token and were widened to whole tokens", name, report.snapped, report.spans)
    for what, count in (("overlapped a longer span", report.overlapping), ("covered no token", report.empty),
                        ("lost their tokens to an earlier span", report.shared_token)):
        if count:
            log.info("control %s: %d span(s) %s and were left out of training", name, count, what)


class _TokenLayers(torch.nn.Module):
    def __init__(self, heads: dict[str, TokenHead]):
        super().__init__()
        self.layers = torch.nn.ModuleDict()
        for name, head in heads.items():
            layer = torch.nn.Linear(head.weight.shape[1], head.weight.shape[0])
            with torch.no_grad():
                layer.weight.copy_(torch.from_numpy(head.weight))
                layer.bias.copy_(torch.from_numpy(head.bias))
            self.layers[name] = layer


def fine_tune_tokens(
    encoder: "Encoder",
    heads: dict[str, TokenHead],
    data: Sequence[TokenData],
    args: "TrainingArguments",
    progress: Progress | None = None,
) -> tuple["Encoder", dict[str, TokenHead], dict]:
    """Fine-tune a copy of ``encoder`` together with the token heads (warm start from both).

    The same recipe as classification (``trainer.fine_tune``): batches per control,
    shuffled with the seed; the schedule from ``full_schedule`` over the training
    windows; AdamW, linear warm-up and decay, gradient clipping, bf16 autocast on CUDA (fp16 with a gradient scaler where bf16 is missing);
    token cross-entropy, special tokens and padding ignored.
    """
    from .trainer import encoder_groups, full_schedule, set_seed, training_copy, warmup_linear_decay

    set_seed(args.seed)
    device = encoder.device
    student = training_copy(encoder)
    layers = _TokenLayers({d.name: heads[d.name] for d in data}).to(device).train()
    examples: dict[str, list[tuple[list[int], list[int]]]] = {}
    tagging: dict[str, dict] = {}
    for control in data:
        examples[control.name], report = training_windows(student.tokenizer, control, student.readable_length(args.max_length))
        _log_report(control.name, report)
        tagging[control.name] = report.as_dict()
    total = sum(len(e) for e in examples.values())
    epochs, steps = full_schedule(total, args)
    rng = random.Random(args.seed)
    batches: list[tuple[str, list[int]]] = []

    def refill() -> None:
        for name, rows in examples.items():
            order = list(range(len(rows)))
            rng.shuffle(order)
            for start in range(0, len(order), args.batch_size):
                batches.append((name, order[start : start + args.batch_size]))
        rng.shuffle(batches)

    optimizer = torch.optim.AdamW(
        encoder_groups(student.model, args.learning_rate, args.weight_decay)
        + [{"params": layers.parameters(), "lr": args.head_learning_rate, "weight_decay": 0.0}]
    )
    scheduler = warmup_linear_decay(optimizer, steps, args.warmup_ratio)
    train_step = TrainingStep(device, optimizer, list(student.model.parameters()) + list(layers.parameters()))
    pad = student.tokenizer.pad_token_id or 0
    started = time.perf_counter()
    losses: list[float] = []
    seen = 0
    diverged = None
    for step in range(steps):
        if not batches:
            refill()
        name, rows = batches.pop()
        ids, mask = _pad_batch([examples[name][r][0] for r in rows], pad)
        target = torch.full(ids.shape, IGNORE, dtype=torch.long)
        for k, r in enumerate(rows):
            tags = examples[name][r][1]
            target[k, : len(tags)] = torch.tensor(tags, dtype=torch.long)
        ids, mask, target = ids.to(device), mask.to(device), target.to(device)
        with train_step.autocast():
            hidden = student.model(input_ids=ids, attention_mask=mask).last_hidden_state
            logits = layers.layers[name](hidden).float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE)
        if not torch.isfinite(loss.detach()):  # diverged (and a NaN in the job's progress is no JSON)
            log.warning("entity fine-tuning stopped at step %d: the loss is not finite", step + 1)
            diverged = step + 1
            break
        train_step(loss)
        scheduler.step()
        losses.append(float(loss.detach()))
        seen += len(rows)
        if progress and (step % 10 == 0 or step == steps - 1):
            progress({"stage": "ner-fine-tune", "step": step + 1, "steps": steps, "loss": round(float(np.mean(losses[-10:])), 4)})
    elapsed = time.perf_counter() - started
    student.model.eval()
    new_heads = {}
    for control in data:
        layer = layers.layers[control.name]
        new_heads[control.name] = TokenHead(
            labels=list(heads[control.name].labels),
            weight=layer.weight.detach().float().cpu().numpy(),
            bias=layer.bias.detach().float().cpu().numpy(),
            trained=True,
            source="trained",
        )
    report = {
        "epochs": epochs,
        "steps": steps,
        "windows": total,
        "windows_seen": seen,
        "seconds": round(elapsed, 2),
        "windows_per_second": round(seen / elapsed, 1) if elapsed else None,
        "final_loss": round(float(np.mean(losses[-10:])), 4) if losses else None,
        "tagging": tagging,
        **({"diverged_at_step": diverged} if diverged is not None else {}),
    }
    return student, new_heads, report


def token_states(encoder: "Encoder", windows_: Sequence[tuple[list[int], list[int]]], batch_size: int = 32):
    """Hidden states and tags of every tagged token of the windows (frozen encoder)."""
    pad = encoder.tokenizer.pad_token_id or 0
    states, tags = [], []
    with encoder.lock, torch.no_grad():  # not inference_mode: the states feed an optimiser
        for start in range(0, len(windows_), batch_size):
            chunk = windows_[start : start + batch_size]
            ids, mask = _pad_batch([ids for ids, _ in chunk], pad)
            with encoder.autocast():  # the states the head is fitted on are those it will be served
                hidden = encoder.model(input_ids=ids.to(encoder.device), attention_mask=mask.to(encoder.device)).last_hidden_state
            hidden = hidden.float().cpu()
            for r, (_, window_tags) in enumerate(chunk):
                keep = [k for k, t in enumerate(window_tags) if t != IGNORE]
                states.append(hidden[r, keep])
                tags.extend(window_tags[k] for k in keep)
    dim = encoder.dim
    return (torch.cat(states) if states else torch.zeros(0, dim)), torch.tensor(tags, dtype=torch.long)


def fit_token_head(
    encoder: "Encoder", head: TokenHead, data: TokenData, args: "TrainingArguments", l2: float = 1e-3
) -> tuple[TokenHead, dict]:
    """The token head alone on the frozen encoder's token states (seconds; no new encoder)."""
    from .trainer import _fit_linear

    started = time.perf_counter()
    examples, report = training_windows(encoder.tokenizer, data, encoder.readable_length(args.max_length))
    _log_report(data.name, report)
    examples, sampled = capped_windows(examples, MAX_FIT_TOKENS, args.seed)
    x, y = token_states(encoder, examples)
    if not len(y):
        return head, {"tokens": 0, "tagging": report.as_dict()}
    prior = torch.from_numpy(head.weight.astype(np.float32)) if head.trained else torch.zeros(head.weight.shape)
    weight, bias = _fit_linear(x, y, prior, torch.zeros(head.weight.shape[0]), l2, multiple=False)
    fitted = TokenHead(list(head.labels), weight.numpy(), bias.numpy(), trained=True, source="trained")
    return fitted, {
        "tokens": int(len(y)),
        "windows_sampled": sampled,
        "l2": l2,
        "seconds": round(time.perf_counter() - started, 3),
        "tagging": report.as_dict(),
    }


def capped_windows(windows_: list, max_tokens: int, seed: int) -> tuple[list, bool]:
    """The windows whose tagged tokens fit in ``max_tokens``: all of them when they do, else a
    seeded sample in text order; and whether it was sampled."""
    sizes = [sum(1 for t in tags if t != IGNORE) for _, tags in windows_]
    if sum(sizes) <= max_tokens:
        return windows_, False
    order = list(range(len(windows_)))
    random.Random(seed).shuffle(order)
    chosen, total = [], 0
    for i in order:
        if total + sizes[i] > max_tokens:
            continue
        chosen.append(i)
        total += sizes[i]
    log.info("%d of %d training windows (%d tokens) sampled for the frozen token head", len(chosen), len(windows_),
             total)
    return [windows_[i] for i in sorted(chosen)], True


def as_tagged(tokenizer, texts: Sequence[str], spans: Sequence[Sequence[Span]], labels: Sequence[str]) -> list[list[Span]]:
    """The annotated spans as training tags them and decoding reads them back: widened to whole
    tokens, trimmed of surrounding whitespace, run on through combining marks, overlaps resolved
    (the longest wins) — the best any prediction can match.  A region drawn over ``"Paris "``, or
    over "Paris" inside the token "Parisian", is then matched by what a model that learned its
    tags exactly predicts."""
    out = []
    for text, tokenized, gold in zip(texts, tokenize(tokenizer, texts), spans):
        tags, _ = token_tags(tokenized.offsets, gold, labels)
        out.append([found.span for found in decode(text, tokenized.offsets, tags, labels, words=tokenized.words)])
    return out


def evaluate_tokens(encoder: "Encoder", head: TokenHead, data: TokenData, batch_size: int = 32) -> dict:
    """Entity-level P/R/F1 of ``head`` against the annotated spans (exact match), each read as
    training tags it (:func:`as_tagged`)."""
    predicted = [[s.span for s in found] for found in predict_spans(encoder, head, data.texts, batch_size)]
    gold = as_tagged(encoder.tokenizer, data.texts, data.spans, data.labels)
    return span_scores(gold, predicted)

