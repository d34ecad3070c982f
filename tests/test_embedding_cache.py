"""This machine's embedding cache (``ls_backend.embeddings``): encoders unused for ``CACHE_MAX_AGE_DAYS``
lose their rows, at the end of a job at most once a day, or with ``ls-backend cache --prune``."""

from __future__ import annotations

import json
import sqlite3
import time

import numpy as np
import pytest

from ls_backend.embeddings import EmbeddingCache
from ls_backend.settings import Settings

DAY = 86_400.0


class FakeEncoder:
    """Stands in for the transformer: the cache is what is under test, and it only needs vectors."""

    max_length, dim, precision_tag = 64, 8, "fp32"

    def __init__(self):
        self.encoded = 0

    def encode(self, texts, batch_size=32):
        self.encoded += len(texts)
        return np.stack([np.full(self.dim, len(t), dtype=np.float32) for t in texts])


def _backdate(cache: EmbeddingCache, encoder: str, days: float) -> None:
    with sqlite3.connect(cache.path) as db:
        db.execute("UPDATE encoders SET used = ? WHERE encoder = ?", [time.time() - days * DAY, encoder])


def _rows(cache: EmbeddingCache) -> dict[str, int]:
    return {u.encoder: u.rows for u in cache.usage()}


def test_encoders_unused_for_the_max_age_lose_their_rows_and_used_ones_keep_them(tmp_path):
    cache, encoder = EmbeddingCache(tmp_path), FakeEncoder()
    texts = [f"text number {i}" for i in range(30)]
    for name in ("base:old", "p1/v2:aa", "p1/v3:bb"):
        cache.encode(encoder, name, texts)
    _backdate(cache, "base:old", 40)
    _backdate(cache, "p1/v2:aa", 40)
    cache.encode(encoder, "p1/v2:aa", texts[:3])  # read from the cache: that is a use too
    assert encoder.encoded == 90
    removed = cache.prune(30 * DAY)
    assert [(r.encoder, r.rows) for r in removed] == [("base:old", 30)]
    assert _rows(cache) == {"p1/v2:aa": 30, "p1/v3:bb": 30}
    # what was kept is still read, not encoded again; what was removed is encoded anew
    cache.encode(encoder, "p1/v3:bb", texts)
    assert encoder.encoded == 90
    vectors, missed = cache.encode(encoder, "base:old", texts[:5])
    assert missed == 5 and vectors[0][0] == len(texts[0])


def test_weights_replaced_at_the_same_path_with_the_same_size_and_time_get_another_stamp(tmp_path):
    """A reproducible image build sets every file's time alike: a model of the same shape swapped in
    at the same path kept the old one's name, and its texts were read from the old weights' rows."""
    import os

    from ls_backend.embeddings import weights_stamp

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "bert"}')
    weights = folder / "model.safetensors"
    weights.write_bytes(bytes(range(256)) * 64)
    os.utime(weights, ns=(10**18, 10**18))
    first = weights_stamp(str(folder))
    assert first and weights_stamp(str(folder)) == first
    swapped = tmp_path / "swapped"  # another model of the same shape, written in place of the first
    swapped.write_bytes(bytes(reversed(range(256))) * 64)
    os.utime(swapped, ns=(10**18, 10**18))
    os.replace(swapped, weights)
    assert weights.stat().st_size == 256 * 64 and weights.stat().st_mtime_ns == 10**18
    assert weights_stamp(str(folder)) not in ("", first)
    assert weights_stamp(str(tmp_path / "absent")) == ""


def test_a_cache_written_before_uses_were_kept_gets_a_full_period(tmp_path):
    cache = EmbeddingCache(tmp_path)
    with sqlite3.connect(cache.path) as db:  # rows with no recorded use, as an older version wrote them
        db.executemany("INSERT INTO embeddings (encoder, key, vector) VALUES (?, ?, ?)",
                       [("legacy", str(i), np.zeros(8, np.float32).tobytes()) for i in range(4)])
    assert [u.used for u in cache.usage()] == [None]
    now = time.time()
    assert cache.prune(30 * DAY, now=now) == []
    assert _rows(cache) == {"legacy": 4}
    assert [(r.encoder, r.rows) for r in cache.prune(30 * DAY, now=now + 31 * DAY)] == [("legacy", 4)]
    assert _rows(cache) == {}


def test_the_daily_prune_runs_once_a_day_and_never_with_a_max_age_of_zero(tmp_path):
    cache, encoder = EmbeddingCache(tmp_path), FakeEncoder()
    cache.encode(encoder, "a", ["x", "y"])
    _backdate(cache, "a", 10)
    now = time.time()
    assert cache.prune_daily(0, now=now) is None  # CACHE_MAX_AGE_DAYS=0: kept for good
    assert cache.prune_daily(30 * DAY, now=now) == []  # ran: nothing that old
    cache.encode(encoder, "b", ["z"])
    _backdate(cache, "b", 40)
    assert cache.prune_daily(30 * DAY, now=now + 3600) is None  # not due: pruned an hour ago
    assert _rows(cache) == {"a": 2, "b": 1}
    assert [r.encoder for r in cache.prune_daily(30 * DAY, now=now + DAY + 1)] == ["b"]


def test_past_the_row_cap_the_rows_written_longest_ago_go_whatever_their_encoder(tmp_path):
    """An encoder in use (the base one, almost always) kept the rows of every text it ever embedded:
    tasks deleted or edited long since stayed for good, and the file only grew."""
    cache, encoder = EmbeddingCache(tmp_path), FakeEncoder()
    cache.encode(encoder, "base", [f"day 1 text {i}" for i in range(6)])
    cache.encode(encoder, "tuned", [f"day 2 text {i}" for i in range(3)])
    cache.encode(encoder, "base", [f"day 3 text {i}" for i in range(4)])
    cache.encode(encoder, "base", ["day 1 text 5"])  # read, not written: its age stays
    assert cache.prune(30 * DAY, max_rows=0) == [] and sum(_rows(cache).values()) == 13  # no cap
    removed = cache.prune(30 * DAY, max_rows=8)
    assert [(r.encoder, r.rows, r.reason) for r in removed] == [("base", 5, "cap")]
    assert _rows(cache) == {"base": 5, "tuned": 3}
    _, missed = cache.encode(encoder, "base", ["day 1 text 0", "day 3 text 0"])
    assert missed == 1  # the oldest is embedded again, and written anew (the newest row now)
    removed = cache.prune(30 * DAY, max_rows=8)
    assert [(r.encoder, r.rows, r.reason) for r in removed] == [("base", 1, "cap")]
    assert cache.encode(encoder, "base", ["day 1 text 0"])[1] == 0  # kept: it was written last
    # the daily prune applies the cap with CACHE_MAX_AGE_DAYS=0 too
    now = time.time() + 2 * DAY
    assert [r.reason for r in cache.prune_daily(0, now=now, max_rows=2)] == ["cap", "cap"]
    assert sum(_rows(cache).values()) == 2


def test_a_job_prunes_the_cache_and_a_machine_without_one_gets_none(tmp_path, monkeypatch):
    from ls_backend import finetune, jobs

    monkeypatch.setattr(finetune.FineTuneJob, "run", lambda self, key, trigger: {"version": "p5-v2", "promoted": False})
    settings = Settings(model_dir=tmp_path / "models", cache_dir=str(tmp_path / "cache"), cache_max_age_days=7)
    jobs.execute_training(settings, "5.1732665262", "labels")
    assert not (tmp_path / "cache").exists()  # no cache made only to be pruned
    cache = EmbeddingCache(tmp_path / "cache")
    cache.encode(FakeEncoder(), "retired", ["one", "two"])
    cache.encode(FakeEncoder(), "serving", ["one"])
    _backdate(cache, "retired", 8)
    jobs.execute_training(settings, "5.1732665262", "labels")
    assert _rows(cache) == {"serving": 1}
    # CACHE_MAX_AGE_DAYS=0 keeps every encoder's rows, and CACHE_MAX_ROWS still bounds them
    capped = Settings(model_dir=tmp_path / "models", cache_dir=str(tmp_path / "cache2"), cache_max_age_days=0,
                      cache_max_rows=2)
    EmbeddingCache(tmp_path / "cache2").encode(FakeEncoder(), "serving", ["one", "two", "three"])
    jobs.execute_training(capped, "5.1732665262", "labels")
    assert _rows(EmbeddingCache(tmp_path / "cache2")) == {"serving": 2}


def test_the_cache_command_lists_encoders_and_prunes_with_the_space_given_back(tmp_path, monkeypatch, capsys):
    from ls_backend import cli

    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("CACHE_DIR", str(tmp_path / "cache"))
    assert cli.main(["cache"]) == 0
    assert json.loads(capsys.readouterr().out)["encoders"] == []
    assert not (tmp_path / "cache").exists()  # looking does not make one
    cache = EmbeddingCache(tmp_path / "cache")
    texts = [f"a text of some length, number {i} " * 20 for i in range(400)]
    cache.encode(FakeEncoder(), "old", texts)
    cache.encode(FakeEncoder(), "new", texts[:10])
    _backdate(cache, "old", 3)
    assert cli.main(["cache"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(e["encoder"], e["rows"]) for e in listed["encoders"]] == [("new", 10), ("old", 400)]
    assert cli.main(["cache", "--prune", "--older-than", "2"]) == 0
    pruned = json.loads(capsys.readouterr().out)
    assert [(e["encoder"], e["rows"]) for e in pruned["removed"]] == [("old", 400)]
    assert [e["encoder"] for e in pruned["encoders"]] == ["new"]
    assert pruned["bytes"] < pruned["bytes_before"]
    with pytest.raises(SystemExit):
        cli.main(["cache", "--prune", "--older-than", "nan"])
    monkeypatch.setenv("CACHE_MAX_AGE_DAYS", "0")
    monkeypatch.setenv("CACHE_MAX_ROWS", "4")  # no age, but a cap: the oldest rows past it go
    assert cli.main(["cache", "--prune"]) == 0
    capped = json.loads(capsys.readouterr().out)
    assert [(e["encoder"], e["rows"], e["reason"]) for e in capped["removed"]] == [("new", 6, "cap")]
    monkeypatch.setenv("CACHE_MAX_ROWS", "0")
    assert cli.main(["cache", "--prune"]) == 2
    assert "--older-than" in capsys.readouterr().err
    assert cli.main(["cache", "--prune", "--older-than", "0"]) == 0  # every encoder, however recent
    emptied = json.loads(capsys.readouterr().out)
    assert [(e["encoder"], e["rows"]) for e in emptied["removed"]] == [("new", 4)] and emptied["encoders"] == []
    # a cache file that is no database (a torn copy): set aside, and an empty cache in its place
    cache.path.write_bytes(b"garbage")
    assert cli.main(["cache"]) == 0 and json.loads(capsys.readouterr().out)["encoders"] == []
    assert [p.read_bytes() for p in cache.path.parent.glob("embeddings.sqlite.corrupt-*")] == [b"garbage"]


def _damage(cache: EmbeddingCache) -> None:
    """Every page after the first overwritten (a disk error, a copy torn mid-write): the header still
    reads, so the file opens, and the first read of a table fails ("database disk image is malformed")."""
    with sqlite3.connect(cache.path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page = db.execute("PRAGMA page_size").fetchone()[0]
    data = bytearray(cache.path.read_bytes())
    data[page:] = np.random.default_rng(0).integers(0, 256, len(data) - page, dtype=np.uint8).tobytes()
    cache.path.write_bytes(bytes(data))


def test_a_cache_with_damaged_pages_is_set_aside_wherever_it_is_read(tmp_path):
    """A cache whose header still reads but whose pages do not failed every job that read it
    ("database disk image is malformed"), and the cache command too."""
    encoder = FakeEncoder()
    cache = EmbeddingCache(tmp_path)
    texts = [f"text number {i}" for i in range(300)]
    cache.encode(encoder, "a", texts)
    _damage(cache)
    vectors, missed = EmbeddingCache(tmp_path).encode(encoder, "a", texts[:50])
    assert missed == 50 and [v[0] for v in vectors[:2]] == [len(texts[0]), len(texts[1])]
    assert len(list(tmp_path.glob("embeddings.sqlite.corrupt-*[0-9]"))) == 1
    assert _rows(cache) == {"a": 50}  # an empty cache took its place, and keeps the new rows
    _damage(cache)
    assert cache.usage() == [] and cache.prune(0, max_rows=1) == []
    assert len(list(tmp_path.glob("embeddings.sqlite.corrupt-*[0-9]"))) >= 2
    # a process that read the damaged file after another had set it aside leaves the new one alone
    fresh = EmbeddingCache(tmp_path)
    fresh.encode(encoder, "a", texts[:3])
    fresh._recover(sqlite3.DatabaseError("database disk image is malformed"), inode=-1)
    assert _rows(fresh) == {"a": 3}
    with pytest.raises(sqlite3.OperationalError):  # a lock or a full disk is no damage: nothing set aside
        fresh._recover(sqlite3.OperationalError("database is locked"), inode=fresh._inode())
    assert _rows(fresh) == {"a": 3}


@pytest.mark.parametrize("damage", ["no database", "damaged pages"])
def test_a_cache_file_that_is_no_database_is_set_aside_and_the_job_embeds_anew(tmp_path, damage):
    """Every job failed on "file is not a database" (or "database disk image is malformed") until
    someone deleted the file by hand."""
    from ls_backend.finetune import FineTuneJob
    from ls_backend.store import CorrectionStore

    from .support.events import annotation_event, choices, key_of
    from .support.loop import balanced_agnews

    if damage == "no database":
        (tmp_path / "cache").mkdir()
        (tmp_path / "cache" / "embeddings.sqlite").write_bytes(b"garbage")
    else:
        cache = EmbeddingCache(tmp_path / "cache")
        cache.encode(FakeEncoder(), "another encoder", [f"text number {i}" for i in range(300)])
        _damage(cache)
    settings = Settings(model_dir=tmp_path / "models", cache_dir=str(tmp_path / "cache"), train_mode="frozen",
                        max_length=64)
    store = CorrectionStore.from_settings(settings)
    try:
        for n, (task, text, label) in enumerate(balanced_agnews(4)):
            store.record_event(annotation_event(n + 1, task, choices(label), text=text))
        assert FineTuneJob(settings, store).run(key_of(3))["promoted"]
    finally:
        store.close()
    assert len(list((tmp_path / "cache").glob("embeddings.sqlite.corrupt-*[0-9]"))) == 1


def test_reading_cached_rows_never_waits_on_a_writer_elsewhere_and_marks_a_use_at_most_hourly(tmp_path):
    """A prune or a VACUUM in another process holds the write lock: a job reading its cached
    embeddings must not fail on it ("database is locked" after the 30 s busy wait)."""
    cache, encoder = EmbeddingCache(tmp_path), FakeEncoder()
    texts = [f"text {i}" for i in range(20)]
    cache.encode(encoder, "a", texts)
    marked = cache.usage()[0].used
    cache.encode(encoder, "a", texts[:2])
    assert cache.usage()[0].used == marked  # a use within the hour is not written again
    _backdate(cache, "a", 2 / 24)  # two hours ago: the next read would mark it
    holder = sqlite3.connect(cache.path, timeout=1)
    holder.execute("BEGIN IMMEDIATE")  # another process writing
    try:
        vectors, missed = cache.encode(encoder, "a", texts)
    finally:
        holder.rollback()
        holder.close()
    assert missed == 0 and encoder.encoded == 20 and vectors[3][0] == len(texts[3])


def test_new_rows_that_cannot_be_written_are_used_all_the_same(tmp_path, monkeypatch, caplog):
    """A write lock held past the wait (a long prune, a VACUUM) or a full disk failed the whole job
    after its texts were embedded ("database is locked" after 30 s)."""
    monkeypatch.setattr(EmbeddingCache, "WRITE_WAIT_S", 0.2, raising=False)
    cache, encoder = EmbeddingCache(tmp_path), FakeEncoder()
    cache.encode(encoder, "a", ["warm"])
    holder = sqlite3.connect(cache.path, timeout=1)
    holder.execute("BEGIN IMMEDIATE")  # another process writing
    try:
        started = time.monotonic()
        vectors, missed = cache.encode(encoder, "a", ["one", "three"])
        waited = time.monotonic() - started
    finally:
        holder.rollback()
        holder.close()
    assert missed == 2 and [v[0] for v in vectors] == [3.0, 5.0] and waited < 5
    assert "2 new embeddings not kept" in caplog.text
    assert _rows(cache) == {"a": 1}  # not kept: embedded again next time, then kept
    cache.encode(encoder, "a", ["one", "three"])
    assert _rows(cache) == {"a": 3} and encoder.encoded == 5


def test_a_refresh_only_job_prunes_too(tmp_path, monkeypatch):
    from ls_backend import jobs, refresh as refresh_module

    monkeypatch.setattr(refresh_module, "refresh_predictions", lambda *args, **kwargs: {"state": "finished"})
    settings = Settings(model_dir=tmp_path / "models", cache_dir=str(tmp_path / "cache"), cache_max_age_days=7)
    cache = EmbeddingCache(tmp_path / "cache")
    cache.encode(FakeEncoder(), "retired", ["one"])
    _backdate(cache, "retired", 8)
    jobs.execute_training(settings, "5.1732665262", "refresh")
    assert _rows(cache) == {}


def test_older_than_without_prune_is_a_usage_error(tmp_path, monkeypatch):
    from ls_backend import cli

    monkeypatch.setenv("CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["cache", "--older-than", "2"])
    assert exit_.value.code == 2
