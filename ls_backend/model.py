"""The one model shape every version has.

A served version = an :class:`Encoder` (a transformer with mean pooling and L2
normalisation) plus one :class:`ClassifierHead` per classification control: a
linear layer over the pooled embedding, read through a softmax (single choice)
or a sigmoid (``choice="multiple"``) after dividing by a temperature.

The cold start builds each head from the embeddings of its label names (rows =
unit vectors, bias 0), so the logits are cosine similarities: zero-shot.  Trained
versions change the rows, the biases, the temperature and possibly the encoder;
the predictor never needs to know which.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import unicodedata
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from itertools import chain
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from .precision import autocast, inference_dtype, short_name
from .text import readable, utf8_safe

if TYPE_CHECKING:  # annotations only: the encoder and trainer import without label_studio_sdk
    from .labeling import ControlSpec, LabelingPlan

log = logging.getLogger(__name__)

#: For multi-label zero-shot heads: the cosine similarity at which a label's
#: probability is 0.5.  Measured with the bundled encoder on 600 AG News texts:
#: the right label's name sits at 0.13 on average, the others at 0.05.
ZERO_SHOT_MULTI_MIDPOINT = 0.09


#: ``Encoder.tokenize`` splits a list of at least twice this many texts over threads: the fast
#: tokenizer's Rust core releases the GIL, and one core's tokenizer caps a GPU's throughput
#: (bench/gpu.py on an H100: 2,690 texts/s of 128 tokens on one core, 25,823/s on 16 threads;
#: the model alone runs 50,360/s).
TOKENIZE_CHUNK = 512

#: On CUDA, ``Encoder.encode`` of more texts than this runs them in parts of this many (each part
#: sorted by length on its own), while the tokenizer's threads work on the parts ahead: the
#: tokenizer and the model run side by side instead of one after the other (bench/gpu.py on an
#: H100 before this: tokenizer alone 25,823 texts/s, model alone 50,360/s, end to end 17,126/s; on an
#: H200 with it: 31,725/s, 56,230/s and 19,863/s, still about the two one after the other).
OVERLAP_PART = 4096

_pools: dict[str, tuple[int, ThreadPoolExecutor]] = {}  # name -> (the process that made it, the pool)
_pools_lock = threading.Lock()


def tokenize_threads() -> int:
    """Threads for bulk tokenization: the cores this process may run on, at most 16."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(16, cores))


def _thread_pool(name: str, workers: int) -> ThreadPoolExecutor:
    """This process's pool ``name`` (made after any fork: a forked child gets none of its parent's
    threads).  ``tokenize`` and ``encode_overlapped`` fan out on "tokenize"."""
    with _pools_lock:
        made = _pools.get(name)
        if made is None or made[0] != os.getpid():
            made = _pools[name] = (os.getpid(), ThreadPoolExecutor(workers, thread_name_prefix=name))
        return made[1]


#: A tokenizer's ``model_max_length`` below this is a real limit; above, it is the "no limit
#: known" placeholder (``int(1e30)``) of tokenizers saved without one.
SANE_MODEL_MAX_LENGTH = 100_000


def position_limit(model, tokenizer) -> int:
    """The most tokens ``model`` reads in one input.

    ``max_position_embeddings`` alone overstates it for RoBERTa-style models (RoBERTa, XLM-R,
    MPNet): their position ids start after the padding index, so of their 514 positions 512
    are usable; a text cut at 514 tokens would fail the forward pass.  The tokenizer's own
    ``model_max_length``, where it names one, bounds it too."""
    limit = int(getattr(model.config, "max_position_embeddings", 512) or 512)
    positions = getattr(getattr(model, "embeddings", None), "position_embeddings", None)
    padding_idx = getattr(positions, "padding_idx", None)
    if padding_idx is not None:  # position ids run from padding_idx + 1
        limit -= int(padding_idx) + 1
    told = getattr(tokenizer, "model_max_length", None)
    if isinstance(told, int) and 0 < told < SANE_MODEL_MAX_LENGTH:
        limit = min(limit, told)
    return limit


_VISIBLE = re.compile(r"\S+")


def clip_visible(text: str, visible: int, whole_words: bool = False) -> str:
    """``text`` up to its first ``visible`` non-whitespace characters: whitespace, however long its
    runs, does not count (a text of 9,000 newlines and then a sentence keeps its sentence).  With
    ``whole_words``, a word the limit falls inside is left out whole, so no entity is found in half
    a word, unless nothing visible comes before it or it is longer than ``LONG_WORD`` characters
    (text written without spaces, as Chinese or Japanese is: the text would be lost whole)."""
    if len(text) <= visible:
        return text
    seen = 0
    for match in _VISIBLE.finditer(text):
        width = match.end() - match.start()
        seen += width
        if seen >= visible:
            if whole_words and seen > visible and seen - width > 0 and width <= LONG_WORD:
                return text[: match.start()]
            return text[: match.end() - (seen - visible)]
    return text


LONG_WORD = 100  # characters: longer "words" are cut at a limit, not left out whole


def _gives_a_token(word: str) -> bool:
    """Whether the tokenizer keeps anything of ``word``: a letter, digit, punctuation mark or
    symbol; a word of only zero-width or control characters, or of combining marks (stripped with
    the accents), gives no token."""
    return any(ch.isalnum() or unicodedata.category(ch)[0] in "PS" for ch in word)


def clip_for_tokens(text: str, tokens: int) -> str:
    """A prefix of ``text`` that still holds its first ``tokens`` tokens, so that tokenizing it cut
    at ``tokens`` gives the ids of the whole text: the later of ``tokens * 32`` visible characters
    (a token rarely spans more) and the end of the ``tokens``-th whitespace-separated word that
    gives a token (each such word gives at least one, and a word of over 100 characters, a hash or
    a data blob, only one: ``[UNK]``)."""
    if len(text) <= tokens * 32:
        return text
    cut = len(clip_visible(text, tokens * 32))
    words = 0
    for match in _VISIBLE.finditer(text):
        if _gives_a_token(match.group()):
            words += 1
            if words >= tokens:
                return text[: max(cut, match.end())]
    return text


def resolve_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("DEVICE=cuda but no CUDA device is visible to torch")
        return torch.device("cuda")
    return torch.device("cpu")


class Encoder:
    """A transformer encoder with mean pooling, loaded once per process.

    ``encode`` tokenizes a whole list in one fast-tokenizer call, sorts the texts
    by token length, and runs batches padded only to their own longest text.
    Thread safe: forward passes are serialised by a lock (on a CPU the cores are
    already shared; on a GPU one stream is used).

    ``precision`` (an ``INFERENCE_PRECISION`` value, see :mod:`.precision`) sets the dtype
    of ``encode``: autocast on CUDA; on a CPU, ``bfloat16`` converts the weights, which
    makes the encoder inference-only (:meth:`trainable` reloads a float32 copy).
    Pooling always runs in float32.
    """

    def __init__(self, path: str, device: torch.device | str = "cpu", max_length: int = 256, precision: str = "float32"):
        from transformers import AutoModel, AutoTokenizer

        self.path = str(path)
        self.device = torch.device(device)
        self.dtype = inference_dtype(precision, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        if not getattr(self.tokenizer, "is_fast", False):
            raise RuntimeError(f"{self.path}: a fast tokenizer is required (offset mapping)")
        # float32 whatever the checkpoint was saved in (``dtype`` defaults to "auto": a folder saved
        # in fp16 would load in fp16 behind ``weights_dtype``, ``precision_tag`` and ``trainable``)
        self.model = AutoModel.from_pretrained(self.path, dtype=torch.float32).to(self.device).eval()
        # on a CPU the weights themselves take the inference dtype; on CUDA autocast does
        self.weights_dtype = self.dtype if self.device.type == "cpu" else torch.float32
        if self.weights_dtype is not torch.float32:
            self.model = self.model.to(self.weights_dtype)
        self.positions = int(position_limit(self.model, self.tokenizer))  # the most tokens one input may hold
        self.max_length = int(min(max_length, self.positions))
        self.dim = int(self.model.config.hidden_size)
        self._lock = threading.Lock()
        self._bulk: dict[int, object] = {}  # max length -> a tokenizer only ``tokenize`` uses
        self._bulk_lock = threading.Lock()

    @property
    def precision_tag(self) -> str:
        """Names the numbers ``encode`` produces (``fp32``, ``bf16``, ``fp16``), for caches."""
        return short_name(self.dtype)

    def autocast(self):
        return autocast(self.device, self.dtype)

    def trainable(self) -> "Encoder":
        """This encoder when its weights are float32, else a float32 copy loaded from its folder."""
        if self.weights_dtype is torch.float32:
            return self
        return Encoder(self.path, self.device, self.max_length, "float32")

    def reading_as(self, served: "Encoder") -> "Encoder":
        """This encoder's weights read in ``served``'s inference dtype: what a web worker will
        compute with them once saved (a fine-tuned student trains in float32 and serves in bf16 on a
        CPU that has it).  This encoder itself where the dtypes agree, else a twin with its own
        copy of the weights (on a CPU, converted) for slice figures and heads fitted on them."""
        if served.dtype == self.dtype and served.device == self.device:
            return self
        import copy

        twin = copy.copy(self)
        twin.dtype = served.dtype
        twin.weights_dtype = served.dtype if self.device.type == "cpu" else torch.float32
        twin.model = copy.deepcopy(self.model).to(twin.weights_dtype).eval()
        twin._lock, twin._bulk, twin._bulk_lock = threading.Lock(), {}, threading.Lock()
        return twin

    @property
    def lock(self) -> threading.Lock:
        """Held around every forward pass of this encoder's model (see the class docstring)."""
        return self._lock

    def _bulk_tokenizer(self, limit: int):
        """A copy of the fast tokenizer's Rust core that truncates at ``limit`` and never changes
        again, so that threads may encode with it at once.  ``self.tokenizer`` applies each call's
        truncation by changing its core, so a call from another thread (the NER code tokenizes
        without truncation) could cut this thread's texts at its length, or not at all."""
        with self._bulk_lock:
            core = self._bulk.get(limit)
            if core is None:
                from tokenizers import Tokenizer

                core = Tokenizer.from_str(self.tokenizer.backend_tokenizer.to_str())
                core.no_padding()
                core.enable_truncation(limit)
                self._bulk[limit] = core
            return core

    def _tokenize_chunk(self, texts: Sequence[str], limit: int) -> list[list[int]]:
        # absurdly long texts are cut first where nothing truncation would keep is lost
        clipped = [readable(self.tokenizer, utf8_safe(clip_for_tokens(t, limit))) for t in texts]
        core = self._bulk_tokenizer(limit)
        encode = getattr(core, "encode_batch_fast", core.encode_batch)  # no character offsets
        return [e.ids for e in encode(clipped)]

    def readable_length(self, max_length: int | None = None) -> int:
        """``max_length`` (else the serving one) cut to what the model reads: a longer TRAIN_MAX_LENGTH
        than the model's positions would index past them."""
        return min(max_length or self.max_length, self.positions)

    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
        """Token ids with the special tokens, cut at ``max_length`` (the same ids as the tokenizer's
        own ``__call__`` with ``truncation=True``); lists of over ``2 * TOKENIZE_CHUNK`` texts are
        split over ``tokenize_threads()`` threads."""
        limit = self.readable_length(max_length)
        if len(texts) < 2 * TOKENIZE_CHUNK or tokenize_threads() == 1:
            return self._tokenize_chunk(texts, limit)
        parts = [texts[i : i + TOKENIZE_CHUNK] for i in range(0, len(texts), TOKENIZE_CHUNK)]
        out: list[list[int]] = []
        for part in _thread_pool("tokenize", tokenize_threads()).map(lambda p: self._tokenize_chunk(p, limit), parts):
            out.extend(part)
        return out

    def _batches(self, ids: Sequence[Sequence[int]], batch_size: int):
        """Batches of ``ids`` sorted by length (stable), padded to their longest: (rows, ids, mask).
        Each batch is filled in one masked assignment of its concatenated ids: a row-by-row copy
        held the GIL three times as long for AG News texts (0.64 against 0.20 us a text), time
        that the thread feeding the card lacks while tokenizer threads run."""
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        order = np.argsort(lengths, kind="stable")
        pad = self.tokenizer.pad_token_id or 0
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            sizes = lengths[chunk]
            mask = np.arange(int(sizes.max())) < sizes[:, None]
            input_ids = np.full(mask.shape, pad, dtype=np.int64)
            input_ids[mask] = np.fromiter(chain.from_iterable([ids[i] for i in chunk]), dtype=np.int64,
                                          count=int(sizes.sum()))
            yield chunk.tolist(), torch.from_numpy(input_ids), torch.from_numpy(mask.astype(np.int64))

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean-pooled, L2-normalised embeddings (differentiable; used by training too)."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * mask).sum(dim=1)
        counts = mask.sum(dim=1).clamp(min=1.0)
        return torch.nn.functional.normalize(summed / counts, dim=-1)

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Unit-length embeddings, one row per text, in the order given."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.device.type == "cuda" and len(texts) > OVERLAP_PART:
            return self.encode_overlapped(texts, batch_size, OVERLAP_PART)
        return self.encode_ids(self.tokenize(texts), batch_size)

    def encode_overlapped(self, texts: Sequence[str], batch_size: int, part: int) -> np.ndarray:
        """``encode`` in parts of ``part`` texts while every tokenizer thread works on the parts
        ahead: chunks of the list are queued on the tokenizer's pool in order (at most
        ``2 * max(parts' chunks, threads)`` ahead, so memory stays bounded), and the card runs each
        part as soon as its chunks are tokenized."""
        chunk = max(1, min(TOKENIZE_CHUNK, part))
        per_part = max(1, part // chunk)
        threads = tokenize_threads()
        window = 2 * max(per_part, threads)
        pool = _thread_pool("tokenize", threads)
        limit = self.max_length
        starts = iter(range(0, len(texts), chunk))
        queued: deque = deque()
        done: list[np.ndarray] = []
        while True:
            for start in starts:
                queued.append(pool.submit(self._tokenize_chunk, texts[start : start + chunk], limit))
                if len(queued) >= window:
                    break
            if not queued:
                break
            ids = [row for _ in range(min(per_part, len(queued))) for row in queued.popleft().result()]
            done.append(self.encode_ids(ids, batch_size))
        return np.concatenate(done)

    def encode_ids(self, ids: Sequence[Sequence[int]], batch_size: int = 32) -> np.ndarray:
        """``encode`` of texts already tokenized by :meth:`tokenize`.

        On CUDA the batches are queued without waiting for each other (pinned memory,
        non-blocking copies), so the host pads batch k+1 while the card runs batch k; the
        embeddings come back in one copy at the end.
        """
        result = np.zeros((len(ids), self.dim), dtype=np.float32)
        if not len(ids):
            return result
        cuda = self.device.type == "cuda"
        order: list[int] = []
        pending: list[torch.Tensor] = []
        with self._lock, torch.inference_mode():
            for chunk, input_ids, mask in self._batches(ids, batch_size):
                if cuda:
                    input_ids = input_ids.pin_memory().to(self.device, non_blocking=True)
                    mask = mask.pin_memory().to(self.device, non_blocking=True)
                with self.autocast():
                    emb = self.pooled(input_ids, mask)
                if cuda:
                    order.extend(chunk)
                    pending.append(emb.float())
                else:
                    result[chunk] = emb.float().numpy()
            if cuda:
                result[order] = torch.cat(pending).cpu().numpy()
        return result


def reads_nothing(encoder: Encoder, text: str) -> bool:
    """Whether the model reads no token of ``text``: it holds only characters its tokenizer drops
    (zero-width, control or combining marks, a byte-order mark) or reads as unknown (a lone
    surrogate).  Such a text is as empty as whitespace; embedded, it would be the special tokens
    alone and get a confident guess."""
    if any(ch.isalnum() for ch in text):  # stops at the first letter or digit: almost every text
        return False
    special = set(getattr(encoder.tokenizer, "all_special_ids", ()))
    return all(token in special for token in encoder.tokenize([text])[0])


@dataclass
class ClassifierHead:
    """A linear head over unit embeddings: ``p = softmax|sigmoid((E @ W.T + b) / T)``."""

    labels: list[str]  # result values (aliases where set), one per row
    weight: np.ndarray  # (n_labels, dim)
    bias: np.ndarray  # (n_labels,)
    multiple: bool = False
    temperature: float = 1.0
    threshold: float = 0.5
    trained: bool = False  # False: zero-shot rows only
    zero_shot_rows: list[str] = field(default_factory=list)  # labels whose rows are still zero-shot

    def probabilities(self, embeddings: np.ndarray) -> np.ndarray:
        logits = (embeddings @ self.weight.T + self.bias) / self.temperature
        if self.multiple:
            return 1.0 / (1.0 + np.exp(-logits))
        logits = logits - logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)

    def to_meta(self) -> dict:
        return {
            "labels": list(self.labels),
            "multiple": self.multiple,
            "temperature": float(self.temperature),
            "threshold": float(self.threshold),
            "trained": self.trained,
            "zero_shot_rows": list(self.zero_shot_rows),
        }

    @classmethod
    def from_meta(cls, meta: dict, weight: np.ndarray, bias: np.ndarray) -> "ClassifierHead":
        return cls(
            labels=list(meta["labels"]),
            weight=np.asarray(weight, dtype=np.float32),
            bias=np.asarray(bias, dtype=np.float32),
            multiple=bool(meta.get("multiple", False)),
            temperature=float(meta.get("temperature", 1.0)),
            threshold=float(meta.get("threshold", 0.5)),
            trained=bool(meta.get("trained", False)),
            zero_shot_rows=list(meta.get("zero_shot_rows", [])),
        )


def label_prompts(control: ControlSpec, template: str) -> list[str]:
    return [template.format(label=label.prompt) for label in control.labels]


def zero_shot_head(
    control: ControlSpec,
    encoder: Encoder,
    template: str,
    temperature: float,
    threshold: float,
) -> ClassifierHead:
    """A head whose rows are the embeddings of the label names (or hints)."""
    rows = encoder.encode(label_prompts(control, template))
    bias = np.zeros(len(rows), dtype=np.float32)
    if control.multiple:
        bias -= ZERO_SHOT_MULTI_MIDPOINT
    return ClassifierHead(
        labels=list(control.values),
        weight=rows.astype(np.float32),
        bias=bias,
        multiple=control.multiple,
        temperature=temperature,
        threshold=threshold,
        trained=False,
        zero_shot_rows=list(control.values),
    )


def adapt_head(
    head: ClassifierHead,
    control: ControlSpec,
    encoder: Encoder,
    template: str,
    threshold: float,
    recall: dict[str, tuple] | None = None,
) -> ClassifierHead:
    """The head re-shaped to the control's current labels.

    Rows of labels that still exist are kept (what was learned for them stays);
    labels new to the config get the row ``recall`` holds for them (learned by an earlier version
    of the same encoder: a label that comes back), else zero-shot rows (the learned rows' scale
    is matched so new labels compete fairly); removed labels lose their rows.
    """
    # a row still zero-shot (never trained) is embedded anew from the label's prompt as it is now: an
    # edited hint (or the value behind an alias) must change what the label is matched against
    keep = {label: i for i, label in enumerate(head.labels) if label not in head.zero_shot_rows}
    recalled = {
        value: (row, bias) for value, (row, bias, multiple) in (recall or {}).items()
        if value not in keep and multiple == control.multiple and len(row) == head.weight.shape[1]
    }
    new = [label for label in control.labels if label.value not in keep and label.value not in recalled]
    new_rows = encoder.encode([template.format(label=label.prompt) for label in new]) if new else None
    kept_rows = [head.weight[keep[label.value]] for label in control.labels if label.value in keep]
    scale = float(np.mean([np.linalg.norm(r) for r in kept_rows])) if kept_rows else 1.0
    weight, bias, zero_rows = [], [], []
    new_iter = iter(range(len(new)))
    for label in control.labels:
        if label.value in keep:
            weight.append(head.weight[keep[label.value]])
            bias.append(head.bias[keep[label.value]])
        elif label.value in recalled:
            weight.append(np.asarray(recalled[label.value][0], dtype=np.float32))
            bias.append(recalled[label.value][1])
        else:
            weight.append(new_rows[next(new_iter)] * scale)
            bias.append(float(np.mean(head.bias)) if len(head.bias) else 0.0)
            zero_rows.append(label.value)
    return ClassifierHead(
        labels=list(control.values),
        weight=np.asarray(weight, dtype=np.float32),
        bias=np.asarray(bias, dtype=np.float32),
        multiple=control.multiple,
        temperature=head.temperature,
        threshold=threshold if control.multiple != head.multiple else head.threshold,
        trained=head.trained,
        zero_shot_rows=zero_rows,
    )


def heads_for_plan(
    plan: LabelingPlan,
    previous: dict[str, ClassifierHead],
    encoder: Encoder,
    template: str,
    temperature: float,
    threshold: float,
    recall: dict[str, dict[str, tuple]] | None = None,
) -> dict[str, ClassifierHead]:
    """Heads for every control of ``plan``, reusing ``previous`` where it fits: a
    :class:`ClassifierHead` per Choices control, a ``ner.TokenHead`` per Labels control;
    ``recall``: learned rows of earlier versions, per control and label (:func:`adapt_head`)."""
    from .ner import token_head_for

    heads: dict[str, ClassifierHead] = {}
    for control in plan.controls:
        if control.kind == "labels":
            heads[control.name] = token_head_for(control, previous.get(control.name), encoder.dim, encoder.path)
            continue
        if control.kind != "choices":
            continue
        old = previous.get(control.name)
        if not isinstance(old, ClassifierHead) or old.multiple != control.multiple or not old.trained:
            # (an untrained head is the zero-shot one: made anew from the config's prompts as they are now)
            heads[control.name] = zero_shot_head(control, encoder, template, temperature, threshold)
        elif old.labels == list(control.values) and not old.zero_shot_rows:
            heads[control.name] = old
        else:
            heads[control.name] = adapt_head(old, control, encoder, template, threshold, (recall or {}).get(control.name))
    return heads
