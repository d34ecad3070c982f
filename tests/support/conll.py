"""CoNLL-2003 sentences from ../shared/data as task texts with known character spans."""

from __future__ import annotations

from pathlib import Path

CONLL_LABELS = ("PER", "ORG", "LOC", "MISC")
NO_SPACE_BEFORE = {",", ".", ":", ";", "?", "!", ")", "]", "}", "%", "'s", "'", "n't", "'re", "'ve", "'ll", "'d"}
NO_SPACE_AFTER = {"(", "[", "{", "$"}


def read_sentences(path: Path, limit: int | None = None, offset: int = 0) -> list[list[tuple[str, str]]]:
    """``[(word, IOB2 tag), ...]`` per sentence, in file order."""
    sentences: list[list[tuple[str, str]]] = []
    current: list[tuple[str, str]] = []
    seen = 0
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                if current:
                    if seen >= offset:
                        sentences.append(current)
                    seen += 1
                    current = []
                    if limit is not None and len(sentences) >= limit:
                        return sentences
                continue
            parts = line.split()
            if parts[0] == "-DOCSTART-":
                continue
            current.append((parts[0], parts[-1]))
    if current and seen >= offset and (limit is None or len(sentences) < limit):
        sentences.append(current)
    return sentences


def word_chunks(tags: list[str]) -> list[tuple[int, int, str]]:
    """Entities as word ranges ``[first, last + 1)`` from IOB tags (an I- after O or another
    type starts an entity, as conlleval reads it)."""
    chunks, start, kind = [], None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, label = tag.partition("-")
        if prefix == "O" or prefix == "B" or label != kind:
            if start is not None:
                chunks.append((start, i, kind))
            start, kind = (i, label) if prefix in ("B", "I") else (None, None)
    return chunks


def as_text(sentence: list[tuple[str, str]], natural: bool = False) -> tuple[str, list[tuple[int, int, str]], list[tuple[int, int]]]:
    """The sentence as text, its entities as character spans, and each word's character range.

    ``natural`` writes punctuation as running text does (``said.``, ``(AP)``, ``Germany's``)
    instead of one space between every two tokens.
    """
    pieces, positions = [], []
    length = 0
    previous = None
    for word, _ in sentence:
        spaced = previous is not None and not (natural and (word in NO_SPACE_BEFORE or previous in NO_SPACE_AFTER))
        if spaced:
            pieces.append(" ")
            length += 1
        positions.append((length, length + len(word)))
        pieces.append(word)
        length += len(word)
        previous = word
    text = "".join(pieces)
    spans = [(positions[a][0], positions[b - 1][1], label) for a, b, label in word_chunks([t for _, t in sentence])]
    return text, spans, positions
