"""The encoder's bulk tokenization: the tokenizer's own ids, split over threads, safe beside other users."""

from __future__ import annotations

import threading

import numpy as np

from ls_backend import model as model_module
from ls_backend.model import TOKENIZE_CHUNK

from .support.data import agnews

ODD_TEXTS = ["", " ", "héllo wörld ☃ 日本語 🙂", "x" * 20_000, "word " * 5_000, "tab\tand\nnewline"]


def test_bulk_tokenize_gives_the_ids_of_the_tokenizer_call(encoder):
    texts = [t for t, _ in agnews("dev", 2 * TOKENIZE_CHUNK + 37)] + ODD_TEXTS  # more than one chunk: threads
    for limit in (16, 128):
        reference = encoder.tokenizer(texts, truncation=True, max_length=limit, add_special_tokens=True)["input_ids"]
        assert encoder.tokenize(texts, limit) == reference, limit
    assert encoder.tokenize(ODD_TEXTS[:3], 128) == encoder.tokenizer(ODD_TEXTS[:3], truncation=True, max_length=128)["input_ids"]


def test_large_lists_are_tokenized_on_the_pool_threads(encoder, monkeypatch):
    monkeypatch.setattr(model_module, "tokenize_threads", lambda: 2)
    seen: set[str] = set()
    core = encoder._bulk_tokenizer(64)
    real = model_module._thread_pool

    class Watched:
        def __init__(self, pool):
            self.pool = pool

        def map(self, fn, parts):
            def watched(part):
                seen.add(threading.current_thread().name)
                return fn(part)

            return self.pool.map(watched, parts)

    monkeypatch.setattr(model_module, "_thread_pool", lambda name, workers: Watched(real(name, workers)))
    texts = [t for t, _ in agnews("dev", 3 * TOKENIZE_CHUNK)]
    ids = encoder.tokenize(texts, 64)
    assert len(ids) == len(texts) and all(len(x) <= 64 for x in ids)
    assert seen and all(name.startswith("tokenize") for name in seen), seen
    seen.clear()
    encoder.tokenize(texts[: TOKENIZE_CHUNK], 64)  # a short list stays on the caller's thread
    assert not seen
    assert encoder._bulk_tokenizer(64) is core  # one tokenizer per length, made once


def test_bulk_tokenize_is_safe_while_others_change_the_tokenizers_truncation(encoder):
    """The NER code calls ``encoder.tokenizer`` with its own truncation settings, which a fast
    tokenizer applies by mutating its Rust core; bulk tokenization uses a core of its own."""
    texts = [t for t, _ in agnews("dev", 2 * TOKENIZE_CHUNK + 1)]
    expected = encoder.tokenize(texts, 128)
    errors: list[BaseException] = []
    stop = threading.Event()

    def meddle():
        limits = [16, 32, 48, 96]
        while not stop.is_set():
            try:
                for limit in limits:
                    encoder.tokenizer(texts[:8], truncation=True, max_length=limit, return_offsets_mapping=True)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return

    other = threading.Thread(target=meddle)
    other.start()
    try:
        for _ in range(3):
            assert encoder.tokenize(texts, 128) == expected
    finally:
        stop.set()
        other.join()
    assert not errors, errors


def test_encode_is_encode_ids_of_tokenize(encoder):
    texts = [t for t, _ in agnews("test", 40)] + ["", "short"]
    direct = encoder.encode(texts, 8)
    assert direct.shape == (len(texts), encoder.dim)
    np.testing.assert_allclose(encoder.encode_ids(encoder.tokenize(texts), 8), direct, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(direct, axis=1), 1.0, atol=1e-5)
    assert encoder.encode([], 8).shape == (0, encoder.dim)


def test_overlapped_encode_gives_the_same_embeddings_in_the_same_order(encoder):
    """What ``encode`` does on CUDA for long lists (run here on the CPU): parts tokenized ahead."""
    texts = [t for t, _ in agnews("test", 130)] + ["", "short one"]
    whole = encoder.encode(texts, 16)
    parted = encoder.encode_overlapped(texts, 16, part=50)  # 3 parts, the last one short
    assert parted.shape == whole.shape
    np.testing.assert_allclose(parted, whole, atol=1e-5)
    # 14 parts: more than the tokenizer's queue holds ahead, so it is refilled as parts are taken
    np.testing.assert_allclose(encoder.encode_overlapped(texts, 16, part=10), whole, atol=1e-5)
    assert encoder.encode_overlapped(texts[:7], 16, part=50).shape == (7, encoder.dim)


def test_whitespace_runs_do_not_push_a_long_texts_words_out_of_what_is_read():
    from ls_backend.model import Encoder, clip_visible
    from ls_backend.settings import bundled_encoder_path

    encoder = Encoder(bundled_encoder_path(), "cpu", 32)
    text = "\n" * 9000 + "The central bank raised interest rates again on Tuesday."
    expected = encoder.tokenizer(text, truncation=True, max_length=32)["input_ids"]
    assert encoder.tokenize([text]) == [expected] and len(expected) > 5
    assert clip_visible("abc  def ghi", 5) == "abc  de" and clip_visible("ab", 5) == "ab"
    # for prediction: a word the limit cuts is left out (no entity in half a word), unless it is the first
    assert clip_visible("abc  def ghi", 5, whole_words=True) == "abc  "
    assert clip_visible("abc  def ghi", 6, whole_words=True) == "abc  def"
    assert clip_visible("abcdefgh ij", 5, whole_words=True) == "abcde"
    # ... nor after nothing visible, nor for a text written without spaces: a Chinese text over the
    # limit after a newline, or after a short title line, kept nothing but those
    assert clip_visible("\n  abcdefgh ij", 5, whole_words=True) == "\n  abcde"
    chinese = "新闻\n" + "经济增长" * 40
    assert clip_visible(chinese, 50, whole_words=True) == chinese[:51]
    assert clip_visible("ab " + "c" * 100 + " d", 50, whole_words=True) == "ab "  # a word of 100 is still a word


def test_texts_of_long_words_are_read_as_far_as_the_tokenizers_own_truncation(encoder):
    """A word of over 100 characters (a hash, an ID, a data blob) is one [UNK]: a text of many is
    not cut where a token is assumed to span at most 32 characters."""
    blob = "Ab3xZ9" * 20
    texts = [" ".join([blob] * 300), "see " + " ".join([blob] * 150) + " and the football match ended 3-1",
             "x" * 50_000, "short text",
             # words the tokenizer drops whole: zero-width spaces, soft hyphens, lone combining marks
             " ".join(["\u200b", "\u00ad", "\u0301"] * 2800) + " The football match ended 3-1 on Sunday"]
    for text in texts:
        expected = encoder.tokenizer(text, truncation=True, max_length=encoder.max_length)["input_ids"]
        assert encoder.tokenize([text]) == [expected], (len(text), len(expected))


def test_batches_are_sorted_by_length_and_padded_row_for_row(encoder):
    rng = np.random.default_rng(3)
    ids = [list(rng.integers(1000, 2000, size=int(n))) for n in rng.integers(2, 40, size=75)]
    pad = encoder.tokenizer.pad_token_id or 0
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # stable: ties keep the given order
    batches = list(encoder._batches(ids, 16))
    assert [i for rows, _, _ in batches for i in rows] == order
    for rows, input_ids, mask in batches:
        width = max(len(ids[i]) for i in rows)
        assert input_ids.shape == mask.shape == (len(rows), width)
        for row, i in enumerate(rows):
            n = len(ids[i])
            assert input_ids[row, :n].tolist() == ids[i] and set(input_ids[row, n:].tolist()) <= {pad}
            assert mask[row].tolist() == [1] * n + [0] * (width - n)


def test_a_training_length_longer_than_the_model_reads_is_cut_to_what_it_reads(encoder):
    """TRAIN_MAX_LENGTH=1000 with a 512-position encoder: a 900-token text made every full
    fine-tune fail in its forward pass; it is cut at the encoder's 512 positions instead."""
    long_text = "word " * 900
    assert encoder.positions == 512
    ids = encoder.tokenize([long_text], 1000)[0]
    assert len(ids) == 512
    import torch

    from ls_backend.trainer import pad_batch

    input_ids, mask = pad_batch([ids], encoder.tokenizer.pad_token_id, encoder.device)
    with torch.no_grad():
        assert encoder.pooled(input_ids, mask).shape == (1, encoder.dim)
