"""Text as the tools downstream take it."""

from __future__ import annotations

import threading
import weakref


def utf8_safe(text: str) -> str:
    """``text`` with each lone UTF-16 surrogate ("\\ud800": valid JSON, yet no UTF-8 can hold it,
    and a fast tokenizer fails the whole batch on it) read as "?": one character for one, so
    character offsets stay."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


#: per tokenizer: each character it has been asked about -> whether it reads only as the unknown
#: token; and (under None) the character that stands in for those
_UNREADABLE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_PROBE = threading.Lock()
#: punctuation (which a BERT-style pre-tokenizer splits off as a token of its own) rare enough that a
#: vocabulary may lack it: the first one a tokenizer reads as its unknown token stands in
_STAND_INS = "\u2042\u2051\u2055\u2e19\u2e2a\u203b\u203d\u205c"


def _ids(tokenizer, text: str) -> list[int]:
    backend = getattr(tokenizer, "backend_tokenizer", None)  # (the wrapper's __call__ changes its settings)
    if backend is None:
        return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    encoding = backend.encode(text, add_special_tokens=False)  # padding set in a tokenizer.json pads one character too
    return [i for i, real in zip(encoding.ids, encoding.attention_mask) if real]


def readable(tokenizer, text: str) -> str:
    """``text`` with each character the tokenizer's vocabulary reads only as its unknown token (an
    emoji, many symbols, for a WordPiece vocabulary) replaced by a punctuation mark the vocabulary
    lacks too: one character for one, so offsets stay, and still one unknown token, but split off
    the word it touched.  A WordPiece tokenizer reads a whole word as unknown for one such
    character in it ("❤️Paris" is one ``[UNK]``): the word was lost to every model, and an entity
    beside an emoji was never seen.  A text is left as it is where the tokenizer has no unknown
    token, or no such mark."""
    if text.isascii() or getattr(tokenizer, "unk_token_id", None) is None:
        return text
    unk = tokenizer.unk_token_id
    known = _UNREADABLE.get(tokenizer) or {}
    if None not in known or any(ord(char) > 127 and char not in known for char in text):
        with _PROBE:  # (characters seen before are read without it: tokenizer threads do not queue here)
            known = _UNREADABLE.setdefault(tokenizer, {})
            if None not in known:
                known[None] = next((c for c in _STAND_INS if _ids(tokenizer, c) == [unk]), "")
            for char in set(text):
                if ord(char) > 127 and char not in known:
                    ids = _ids(tokenizer, char)
                    known[char] = bool(ids) and all(i == unk for i in ids)
    stand_in = known[None]
    if not stand_in or not any(known.get(char) for char in text):
        return text
    return "".join(stand_in if known.get(char) else char for char in text)
