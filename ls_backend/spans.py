"""Character spans <-> BIO token tags, windows over long texts, and entity-level scores.

Pure functions over a fast tokenizer's offset mapping (no torch): the NER head
(``ner``) trains and predicts through them, so annotation spans, training tags and
predicted spans all go through the same offsets.

Conventions:

* A span is ``(start, end, label)``: Python string indices (code points) into the
  task text, ``end`` exclusive, so ``text[start:end]`` is the span's text.
* Tags are ``O`` then ``B-X, I-X`` for each label ``X`` in the control's order
  (:func:`bio_tags`); tag ids index that list.
* Offsets are one ``(start, end)`` per token of the text, special tokens excluded,
  as the fast tokenizer reports them (``return_offsets_mapping``).
"""

from __future__ import annotations

import logging
import unicodedata
from dataclasses import dataclass, field
from typing import Iterable, Sequence

log = logging.getLogger(__name__)

Span = tuple[int, int, str]
OUTSIDE = 0
IGNORE = -100  # a token no loss is computed for (special tokens, padding)


def bio_tags(labels: Sequence[str]) -> list[str]:
    """``["O", "B-X", "I-X", "B-Y", "I-Y", ...]`` in label order."""
    tags = ["O"]
    for label in labels:
        tags += [f"B-{label}", f"I-{label}"]
    return tags


def begin_tag(label_index: int) -> int:
    return 1 + 2 * label_index


def inside_tag(label_index: int) -> int:
    return 2 + 2 * label_index


def label_index_of(tag: int) -> int | None:
    """The label a tag id belongs to (``None`` for ``O``)."""
    return None if tag <= 0 else (tag - 1) // 2


def is_begin(tag: int) -> bool:
    return tag > 0 and tag % 2 == 1


# -- annotation spans ------------------------------------------------------------------
def utf16_to_index(text: str, position: int) -> int | None:
    """The code-point index of a UTF-16 code-unit position (JavaScript counts those)."""
    units = 0
    for index, char in enumerate(text):
        if units == position:
            return index
        units += 2 if ord(char) > 0xFFFF else 1
        if units > position:
            return None  # inside a surrogate pair
    return len(text) if units == position else None


def region_labels(value: object) -> list[str]:
    """The labels of a region's ``value`` (``{"labels": [...]}``); anything else reads as none."""
    labels = value.get("labels") if isinstance(value, dict) else None
    return [label for label in labels if isinstance(label, str)] if isinstance(labels, list) else []


def _squeezed(text: str) -> str:
    return " ".join(text.split())


def _same_text(piece: str, quoted: str) -> bool:
    """Whether ``piece`` of the task text is the region's text, or differs only in runs of whitespace."""
    return piece == quoted or _squeezed(piece) == _squeezed(quoted)


def resolve_span(text: str, value: dict) -> tuple[int, int] | None:
    """Where an annotation's ``{"start","end","text"}`` lies in ``text``, or None.

    The offsets are trusted when ``text[start:end]`` equals the span's text (or no
    text is given), also where they differ only in runs of whitespace: Label Studio's
    editor writes a region's text with each run of spaces, tabs or newlines shown as one
    space, and its offsets still count the original characters.  Otherwise they are read
    as UTF-16 positions (what a browser counts when the text holds emoji or other
    characters beyond the BMP); failing that, the occurrence of the span's text nearest
    ``start`` is taken.
    """
    start, end, quoted = value.get("start"), value.get("end"), value.get("text")
    if not isinstance(start, int) or not isinstance(end, int) or isinstance(start, bool) or isinstance(end, bool):
        return None
    if not isinstance(quoted, str) or not quoted:
        return (start, end) if 0 <= start < end <= len(text) else None
    if 0 <= start < end <= len(text) and _same_text(text[start:end], quoted):
        return start, end
    a, b = utf16_to_index(text, start), utf16_to_index(text, end)
    if a is not None and b is not None and a < b and _same_text(text[a:b], quoted):
        return a, b
    found, position = [], text.find(quoted)
    while position >= 0:
        found.append(position)
        position = text.find(quoted, position + 1)
    if not found:
        return None
    nearest = min(found, key=lambda p: (abs(p - start), p))
    return nearest, nearest + len(quoted)


def resolve_overlaps(spans: Iterable[Span]) -> tuple[list[Span], list[Span]]:
    """Non-overlapping spans for BIO tagging: ``(kept, dropped)``.

    The rule: the longest span wins; of two equally long ones the earlier start; of
    two identical extents the one listed first (the label the annotator gave first).
    A span that overlaps any kept one is dropped whole.  Kept spans come back sorted.
    """
    indexed = list(enumerate(spans))
    indexed.sort(key=lambda item: (-(item[1][1] - item[1][0]), item[1][0], item[0]))
    kept: list[Span] = []
    dropped: list[Span] = []
    for _, span in indexed:
        if any(span[0] < other[1] and other[0] < span[1] for other in kept):
            dropped.append(span)
        else:
            kept.append(span)
    return sorted(kept), dropped


@dataclass
class TaggingReport:
    """What happened to the spans of a batch of texts on the way to token tags."""

    spans: int = 0
    snapped: int = 0  # cut a token: widened to whole tokens
    empty: int = 0  # covered no token (whitespace, or characters the tokenizer drops)
    overlapping: int = 0  # dropped by the overlap rule
    shared_token: int = 0  # lost every token to an earlier span after snapping
    unresolved: int = 0  # offsets and text did not match the task text

    def add(self, other: "TaggingReport") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def token_tags(
    offsets: Sequence[tuple[int, int]], spans: Iterable[Span], labels: Sequence[str]
) -> tuple[list[int], TaggingReport]:
    """BIO tag ids per token for character spans.

    Overlaps are resolved first (:func:`resolve_overlaps`).  A span covers every token
    whose characters intersect it, so a span that cuts a token is widened outward to the
    whole token (counted in ``snapped``).  After widening, a token already taken by an
    earlier span stays with it.  Labels not in ``labels`` are ignored by the caller.
    """
    index = {label: i for i, label in enumerate(labels)}
    report = TaggingReport()
    spans = [s for s in spans if s[2] in index]
    report.spans = len(spans)
    kept, dropped = resolve_overlaps(spans)
    report.overlapping = len(dropped)
    tags = [OUTSIDE] * len(offsets)
    taken = [False] * len(offsets)
    starts = [s for s, _ in offsets]
    for start, end, label in kept:
        covered = _covered(offsets, starts, start, end)
        if not covered:
            report.empty += 1
            continue
        free = [t for t in covered if not taken[t]]
        if not free:
            report.shared_token += 1
            continue
        if offsets[covered[0]][0] < start or offsets[covered[-1]][1] > end:
            report.snapped += 1
        tags[free[0]] = begin_tag(index[label])
        for t in free[1:]:
            tags[t] = inside_tag(index[label])
        for t in free:
            taken[t] = True
    return tags, report


def _covered(offsets: Sequence[tuple[int, int]], starts: Sequence[int], start: int, end: int) -> list[int]:
    from bisect import bisect_left

    # tokens are in text order: begin at the first one starting at `start`, then step back
    # over earlier tokens that reach into the span (or have no characters)
    first = bisect_left(starts, start)
    while first > 0 and (offsets[first - 1][1] > start or offsets[first - 1][1] <= offsets[first - 1][0]):
        first -= 1
    covered = []
    for t in range(first, len(offsets)):
        a, b = offsets[t]
        if a >= end:
            break
        if b > a and b > start and a < end:
            covered.append(t)
    return covered


# -- decoding ------------------------------------------------------------------------
@dataclass(frozen=True)
class FoundSpan:
    start: int
    end: int
    label: str
    score: float  # mean probability of the span's tokens' tags

    @property
    def span(self) -> Span:
        return self.start, self.end, self.label


#: scripts written without spaces between words (Thai, Lao, Khmer, Myanmar, Tibetan, Japanese kana,
#: Han), or with particles joined to the noun (Hangul): a BERT-style tokenizer's "word" there is a run
#: of text ("서울에서", "タワーに", a whole Thai phrase), and an entity may end inside it
_RUN_SCRIPTS = (
    (0x0E00, 0x0EFF), (0x0F00, 0x0FFF), (0x1000, 0x109F), (0x1100, 0x11FF), (0x1780, 0x17FF),
    (0x3040, 0x30FF), (0x3130, 0x318F), (0x31F0, 0x31FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF),
    (0xA960, 0xA97F), (0xAC00, 0xD7FF), (0xF900, 0xFAFF), (0xFF66, 0xFFDC), (0x20000, 0x3FFFF),
)


def in_run_script(piece: str) -> bool:
    """Whether ``piece`` holds a character of a script whose tokenizer "words" are runs of text."""
    return any(lo <= ord(char) <= hi for char in piece if ord(char) >= 0x0E00 for lo, hi in _RUN_SCRIPTS)


def through_marks(text: str, end: int, limit: int | None = None) -> int:
    """``end`` moved past the combining marks that follow it (accents of decomposed text, Arabic
    vowel marks, variation selectors), up to ``limit``: the tokenizer drops them, so a token's end
    can fall between a letter and its mark, and a span must not split a character the reader sees
    as one."""
    limit = len(text) if limit is None else min(limit, len(text))
    while end < limit and unicodedata.category(text[end]).startswith("M"):
        end += 1
    return end


def decode(
    text: str,
    offsets: Sequence[tuple[int, int]],
    tags: Sequence[int],
    labels: Sequence[str],
    probabilities: Sequence[float] | None = None,
    words: Sequence[int | None] | None = None,
) -> list[FoundSpan]:
    """Character spans from token tags.

    With ``words`` (the word of each token, as a fast tokenizer gives them), a word is read by
    its first token's tag: the word's other pieces follow it (they extend the open entity, or stay
    outside one), so no span starts or ends inside a word ("Klinsmann" as "K" + "linsmann", or
    "Volgo" and "grad" under two labels), and a span's score is the mean over its words' first
    tokens, where the decisions were made.  A piece in a script written without spaces between
    words, or with particles joined to them (:func:`in_run_script`: Thai, Japanese kana, Hangul...),
    is read by its own tag: the tokenizer's "word" there is a run of text ("서울에서", "タワーに"),
    and the annotator's entity ends inside it ("서울", "タワー").

    ``B-X`` always starts a new entity (so two adjacent entities of one type stay
    apart); ``I-X`` continues an ``X`` entity, or starts one after ``O`` or another
    type (as conlleval and seqeval read IOB).  A span runs from its first token's start
    to its last token's end, is trimmed of surrounding whitespace and runs on through the
    combining marks after it (``through_marks``); tokens with no characters are skipped.  ``text[start:end]`` is the span's text by construction.
    A token that starts inside characters an earlier token covered (a tokenizer that splits a
    character into several tokens with its range each: a Hangul syllable into its letters, a
    byte-level tokenizer an emoji) belongs to that character: it extends the open entity whatever
    its tag, and never starts one, so no two spans share a character.
    """
    found: list[FoundSpan] = []
    current: list[int] = []  # token indices of the open entity
    current_label: int | None = None
    covered = 0  # the end of the characters the tokens so far covered

    def close() -> None:
        nonlocal current, current_label
        if current:
            start, end = offsets[current[0]][0], max(offsets[t][1] for t in current)
            while start < end and text[start].isspace():
                start += 1
            while end > start and text[end - 1].isspace():
                end -= 1
            if start < end:  # through the marks after it, never into the next token
                following = (offsets[t][0] for t in range(current[-1] + 1, len(offsets)) if offsets[t][1] > offsets[t][0])
                end = through_marks(text, end, next(following, None))
                scores = ([float(probabilities[t]) for t in current if t in deciding] or [1.0]) \
                    if probabilities is not None else [1.0]
                found.append(FoundSpan(start, end, labels[current_label], sum(scores) / len(scores)))
        current, current_label = [], None

    deciding: set[int] = set()  # the tokens whose tags made the decisions (a word's first ones)
    for t, tag in enumerate(tags):
        a, b = offsets[t]
        if b <= a:
            continue
        inside, covered = a < covered, max(covered, b)
        continued = (words is not None and t > 0 and words[t] is not None and words[t] == words[t - 1]
                     and not in_run_script(text[a:b]))
        if inside or continued:  # the character's (or the word's) first token decided
            if current:
                current.append(t)
            continue
        deciding.add(t)
        label = label_index_of(int(tag))
        if label is None:
            close()
        elif is_begin(int(tag)) or label != current_label:
            close()
            current, current_label = [t], label
        else:
            current.append(t)
    close()
    return found


# -- windows over long texts ------------------------------------------------------------
def windows(n_tokens: int, size: int, overlap: int | None = None) -> list[tuple[int, int]]:
    """Token ranges ``[start, end)`` of at most ``size`` tokens covering ``n_tokens``.

    Consecutive windows share ``overlap`` tokens (default a quarter of ``size``); the
    last window is moved back to end at the text's end, so it is full too.
    """
    if size < 1:
        raise ValueError("window size must be at least 1")
    if n_tokens <= size:
        return [(0, n_tokens)]
    overlap = size // 4 if overlap is None else overlap
    step = max(1, size - overlap)
    out = []
    start = 0
    while True:
        if start + size >= n_tokens:
            out.append((max(0, n_tokens - size), n_tokens))
            return out
        out.append((start, start + size))
        start += step


def window_owners(n_tokens: int, ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """For each token, ``(window, position in it)``: of the windows holding the token, the
    one where it lies farthest from the nearer window edge (the most context on both
    sides); ties go to the earlier window, so merging is deterministic."""
    owners: list[tuple[int, int]] = [(-1, -1)] * n_tokens
    best = [-1] * n_tokens
    for w, (start, end) in enumerate(ranges):
        for t in range(start, end):
            context = min(t - start, end - 1 - t)
            if context > best[t]:
                best[t] = context
                owners[t] = (w, t - start)
    return owners


# -- entity-level scores ------------------------------------------------------------------
@dataclass
class SpanCounts:
    tp: int = 0
    predicted: int = 0
    gold: int = 0
    per_label: dict[str, list[int]] = field(default_factory=dict)  # label -> [tp, predicted, gold]

    def add(self, gold: Iterable[Span], predicted: Iterable[Span]) -> None:
        gold_set, pred_set = set(gold), set(predicted)
        hits = gold_set & pred_set
        self.tp += len(hits)
        self.predicted += len(pred_set)
        self.gold += len(gold_set)
        for spans, column in ((hits, 0), (pred_set, 1), (gold_set, 2)):
            for span in spans:
                self.per_label.setdefault(span[2], [0, 0, 0])[column] += 1


def _prf(tp: int, predicted: int, gold: int) -> tuple[float, float, float]:
    if predicted == 0 and gold == 0:
        return 1.0, 1.0, 1.0  # nothing to find and nothing found
    precision = tp / predicted if predicted else 0.0
    recall = tp / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def span_scores(gold: Sequence[Iterable[Span]], predicted: Sequence[Iterable[Span]]) -> dict:
    """Entity-level precision, recall and F1, exact match of start, end and label
    (the figures seqeval reports in its default mode, on character spans), micro over
    all entities, plus the same per label.  ``primary`` is the micro F1, or, where the
    texts hold no entity at all, the share of them with no span predicted: F1 would be
    1 for a model that finds nothing and 0 for one with a single false alarm, and a
    gate on it would never let a trained model replace an untrained one."""
    if len(gold) != len(predicted):
        raise ValueError("gold and predicted must list the same texts")
    counts = SpanCounts()
    quiet = 0  # texts with no span predicted
    for g, p in zip(gold, predicted):
        p = list(p)
        quiet += not p
        counts.add(g, p)
    precision, recall, f1 = _prf(counts.tp, counts.predicted, counts.gold)
    per_label = {}
    for label, (tp, npred, ngold) in sorted(counts.per_label.items()):
        p, r, f = _prf(tp, npred, ngold)
        per_label[label] = {"precision": round(p, 4), "recall": round(r, 4), "f1": round(f, 4), "support": ngold}
    return {
        "n": len(gold),
        "entities": counts.gold,
        "predicted": counts.predicted,
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(f1, 4),
        "per_label": per_label,
        "primary": f1 if counts.gold else quiet / max(len(gold), 1),
    }
