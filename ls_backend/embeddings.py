"""A cache of sentence embeddings keyed by (encoder id, text hash), so a head refit never re-encodes.

One SQLite file per machine and ``MODEL_DIR`` (``CACHE_DIR``, by default under ``~/.cache``, never on
the possibly shared ``MODEL_DIR``: SQLite does not belong on a network share): a cache, not a source
of truth — several machines sharing the registry each keep their own, and a miss only costs an encode.
The encoder id names the weights: ``base:<path>#<fingerprint of its files>`` for the base encoder, or the project and version
that hold a fine-tuned ``encoder/`` folder, with the stamp the registry gave those weights.

Each encoder id's last use on this machine is kept beside its rows: the rows of weights no job or refresh
has read or written for ``CACHE_MAX_AGE_DAYS`` (a version long replaced, a project deleted) are removed,
then, past ``CACHE_MAX_ROWS`` rows in all, the rows written longest ago (texts deleted or edited long
since, under an encoder still in use); at most once a day at the end of a job, or on demand with
``ls-backend cache --prune``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .model import Encoder

log = logging.getLogger(__name__)


#: the tokenization rule embeddings are made with, in every encoder id: a new rule (here, characters a
#: vocabulary cannot read split off the words they touch: ``text.readable``) makes every text embedded anew once,
#: instead of cached rows of the older rule mixing with the new ones
TOKENIZATION = "t2"


def encoder_id(meta: dict, base_path: str, encoder: Encoder) -> str:
    """The name of the weights a version's embeddings come from, and their precision: the project
    and version that hold its fine-tuned ``encoder/`` folder (``meta["encoder"]``) with the stamp
    the registry gave those weights when it wrote them, else ``base:<path>#<weights_stamp>``; then the
    tokenization rule (``|t2``), and ``@bf16``/``@fp16`` where the encoder serves in that precision.  Version names carry only Label Studio's project
    id, so two projects of one id (two Label Studio instances, a re-created database) or a project
    whose folder was removed and trained again would otherwise read each other's embeddings."""
    stamp = weights_stamp(base_path)
    name = f"base:{base_path}" + (f"#{stamp}" if stamp else "")
    if meta.get("encoder"):
        stamp = meta.get("encoder_stamp")
        name = f"{meta.get('project', '')}/{meta['encoder']}" + (f":{stamp}" if stamp else "")
    name = f"{name}|{TOKENIZATION}"
    return name if encoder.precision_tag == "fp32" else f"{name}@{encoder.precision_tag}"


def weights_stamp(folder: str) -> str:
    """A short fingerprint of the model files in ``folder`` as they are on disk now (every file's
    name and bytes), so that weights replaced at the same path (a package upgrade, a model swapped
    in a mounted folder, an image built with every file time set alike) are not read from the cache
    under the old ones' name; "" where the folder cannot be read.  Each file's bytes are read once
    per process while its size, time and inode stay the same (0.06 s for the bundled encoder)."""
    path = Path(folder)
    digest = hashlib.sha1()
    try:
        for item in sorted(path.iterdir()):
            if item.is_file():
                digest.update(f"{item.name}\x00{_file_digest(item)}\x00".encode())
    except OSError:
        return ""
    return digest.hexdigest()[:12]


_file_digests: dict[tuple, str] = {}


def _file_digest(item: Path) -> str:
    info = item.stat()
    seen = (str(item), info.st_size, info.st_mtime_ns, info.st_ino)
    if seen not in _file_digests:
        digest = hashlib.sha1()
        with open(item, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _file_digests[seen] = digest.hexdigest()
    return _file_digests[seen]


def text_key(text: str, max_length: int) -> str:
    return hashlib.sha1(f"{max_length}\x00{text}".encode("utf-8", "surrogatepass")).hexdigest()


def cache_file(cache_dir: Path | str) -> Path:
    """The cache's database in ``cache_dir`` (``CACHE_DIR``)."""
    return Path(cache_dir) / "embeddings.sqlite"


class EmbeddingCache:
    def __init__(self, cache_dir: Path | str):
        self.path = cache_file(cache_dir)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._create()

    def _create(self) -> None:
        """Open the cache's file, making it (and its tables) where there is none yet."""
        # WAL is a property of the file, set once; processes that open a new cache together (the
        # first jobs on a machine) race for that switch, which SQLite's busy wait does not cover
        deadline = time.monotonic() + 30
        set_aside = False
        while True:
            try:
                with self._connect() as db:
                    if str(db.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                        db.execute("PRAGMA journal_mode=WAL")
                    db.execute(
                        "CREATE TABLE IF NOT EXISTS embeddings (encoder TEXT NOT NULL, key TEXT NOT NULL, "
                        "vector BLOB NOT NULL, PRIMARY KEY (encoder, key))"
                    )
                    # when each encoder id was last read or written here, and when the cache was last pruned
                    db.execute("CREATE TABLE IF NOT EXISTS encoders (encoder TEXT PRIMARY KEY, used REAL NOT NULL)")
                    db.execute("CREATE TABLE IF NOT EXISTS cache_state (name TEXT PRIMARY KEY, value REAL NOT NULL)")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
            except sqlite3.DatabaseError as exc:  # not a database (a torn copy, a disk error): only a cache
                if set_aside:
                    raise
                set_aside = True
                self._set_aside(exc)

    def _inode(self) -> int | None:
        try:
            return os.stat(self.path).st_ino
        except OSError:
            return None

    def _recover(self, exc: sqlite3.DatabaseError, inode: int | None) -> None:
        """Where ``exc`` is the file's (damaged pages from a disk error or a copy torn mid-write,
        whose header still reads), not a lock or a full disk (raised again): set the cache file read
        as ``inode`` aside and start an empty one, unless another process did so first (the path
        then names a file made since, which is left alone)."""
        if isinstance(exc, sqlite3.OperationalError):
            raise exc
        if inode is not None and self._inode() == inode:
            self._set_aside(exc)
        self._create()

    def _set_aside(self, exc: Exception) -> None:
        """Move a cache file that is no database out of the way (kept, renamed, for a look), so that
        jobs embed anew instead of failing on it one after the other."""
        stamp = base = time.strftime("%Y%m%d-%H%M%S")
        n = 0
        while Path(f"{self.path}.corrupt-{stamp}").exists():  # set aside twice within a second: keep both
            n += 1
            stamp = f"{base}.{n}"
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{self.path}{suffix}", f"{self.path}.corrupt-{stamp}{suffix}")
        log.warning("embedding cache %s could not be read (%s): set aside as %s.corrupt-%s; texts are embedded anew",
                    self.path, exc, self.path.name, stamp)

    @contextlib.contextmanager
    def _connect(self, timeout: float = 30) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=timeout)
        try:
            yield db
            db.commit()
        finally:
            db.close()

    def encode(self, encoder: Encoder, encoder_id: str, texts: Sequence[str], batch_size: int = 32) -> tuple[np.ndarray, int]:
        """Embeddings of ``texts`` (cached ones read, the rest encoded and stored); also the miss count."""
        keys = [text_key(t, encoder.max_length) for t in texts]
        found: dict[str, np.ndarray] = {}
        inode = self._inode()
        try:
            self._mark_used(encoder_id)
            with self._connect() as db:
                unique = list(dict.fromkeys(keys))
                for start in range(0, len(unique), 500):
                    chunk = unique[start : start + 500]
                    marks = ",".join("?" * len(chunk))
                    for key, blob in db.execute(
                        f"SELECT key, vector FROM embeddings WHERE encoder = ? AND key IN ({marks})", [encoder_id, *chunk]
                    ):
                        found[key] = np.frombuffer(blob, dtype=np.float32)
        except sqlite3.DatabaseError as exc:
            found.clear()  # rows read before the damage showed are not trusted either
            self._recover(exc, inode)
        missing = [i for i, key in enumerate(keys) if key not in found]
        if missing:
            first = {}
            for i in missing:
                first.setdefault(keys[i], i)
            order = list(first.values())
            fresh = encoder.encode([texts[i] for i in order], batch_size)
            try:
                with self._connect(timeout=self.WRITE_WAIT_S) as db:
                    db.executemany(
                        "INSERT OR REPLACE INTO embeddings (encoder, key, vector) VALUES (?, ?, ?)",
                        [(encoder_id, keys[i], fresh[row].astype(np.float32).tobytes()) for row, i in enumerate(order)],
                    )
            except sqlite3.Error as exc:  # locked past the wait (a prune, a VACUUM), a full disk: only a cache
                log.warning("embedding cache %s: %d new embeddings not kept (%s); they are used all the same, "
                            "and embedded again next time", self.path, len(order), exc)
            for row, i in enumerate(order):
                found[keys[i]] = fresh[row]
        out = np.zeros((len(texts), encoder.dim), dtype=np.float32)
        for i, key in enumerate(keys):
            out[i] = found[key]
        return out, len(set(keys[i] for i in missing))

    #: a use is written at most this often per encoder (a read of cached rows stays a read)
    MARK_EVERY_S = 3600.0
    #: how long new rows wait for a write lock held elsewhere before they are given up (not the job)
    WRITE_WAIT_S = 5.0

    def _mark_used(self, encoder_id: str) -> None:
        """Record that ``encoder_id`` is in use, before its rows are read (a prune running meanwhile
        then keeps them).  Best effort: where the mark is recent it is not written again, and a
        write lock held elsewhere (a prune, a ``VACUUM``) costs at most a second, never the job;
        an encoder whose mark was missed is at worst pruned and encoded anew."""
        now = time.time()
        try:
            with self._connect(timeout=1.0) as db:
                row = db.execute("SELECT used FROM encoders WHERE encoder = ?", [encoder_id]).fetchone()
                if row is None or now - row[0] >= self.MARK_EVERY_S:
                    db.execute("INSERT INTO encoders (encoder, used) VALUES (?, ?) "
                               "ON CONFLICT (encoder) DO UPDATE SET used = excluded.used", [encoder_id, now])
        except sqlite3.OperationalError:
            pass

    # -- pruning ---------------------------------------------------------------------

    def usage(self) -> list["EncoderUsage"]:
        """Every encoder id with rows here: how many, and when it was last used (None: never recorded,
        a cache written before uses were kept).  A damaged cache is set aside: none."""
        inode = self._inode()
        try:
            with self._connect() as db:
                used = dict(db.execute("SELECT encoder, used FROM encoders"))
                counts = db.execute("SELECT encoder, COUNT(*) FROM embeddings GROUP BY encoder ORDER BY encoder").fetchall()
        except sqlite3.DatabaseError as exc:
            self._recover(exc, inode)
            return []
        return [EncoderUsage(name, rows, used.get(name)) for name, rows in counts]

    def prune(self, max_age_s: float, now: float | None = None, vacuum: bool = False,
              max_rows: int = 0) -> list["EncoderUsage"]:
        """Remove the rows of every encoder id not used for ``max_age_s`` seconds (``0``: none by
        age); then, past ``max_rows`` rows in all (``0``: no cap), the rows written longest ago,
        whatever their encoder (texts of tasks deleted or edited long since, under an encoder
        still in use, would otherwise stay for good).  Returns what was removed, per encoder
        (``reason``: "unused" or "cap").  Ids with rows but no recorded use (a cache from before
        uses were kept) count as used now, so they get a full period.  Freed pages are reused by
        later rows; ``vacuum`` also gives them back to the file system (it rewrites the file: slow
        for a large cache).  A damaged cache is set aside (every row gone with it; none listed)."""
        inode = self._inode()
        try:
            return self._prune(max_age_s, time.time() if now is None else now, vacuum, max_rows)
        except sqlite3.DatabaseError as exc:
            self._recover(exc, inode)
            return []

    def _prune(self, max_age_s: float, now: float, vacuum: bool, max_rows: int) -> list["EncoderUsage"]:
        removed: list[EncoderUsage] = []
        with self._connect() as db:
            db.execute("INSERT OR IGNORE INTO encoders (encoder, used) SELECT DISTINCT encoder, ? FROM embeddings", [now])
            db.execute("INSERT OR REPLACE INTO cache_state (name, value) VALUES ('pruned', ?)", [now])
            stale = []
            if max_age_s > 0:
                stale = db.execute("SELECT encoder, used FROM encoders WHERE used < ? ORDER BY encoder",
                                   [now - max_age_s]).fetchall()
            for name, used in stale:
                rows = db.execute("DELETE FROM embeddings WHERE encoder = ?", [name]).rowcount
                db.execute("DELETE FROM encoders WHERE encoder = ? AND used = ?", [name, used])
                removed.append(EncoderUsage(name, rows, used, "unused"))
            over = db.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0] - max_rows if max_rows > 0 else 0
            if over > 0:  # a row is rewritten (a new rowid) each time it is embedded anew: oldest first
                used = dict(db.execute("SELECT encoder, used FROM encoders"))
                oldest = "SELECT rowid FROM embeddings ORDER BY rowid LIMIT ?"
                for name, rows in db.execute(f"SELECT encoder, COUNT(*) FROM embeddings WHERE rowid IN ({oldest}) "
                                             "GROUP BY encoder ORDER BY encoder", [over]).fetchall():
                    removed.append(EncoderUsage(name, rows, used.get(name), "cap"))
                db.execute(f"DELETE FROM embeddings WHERE rowid IN ({oldest})", [over])
        if vacuum:
            with self._connect() as db:
                db.execute("VACUUM")
        return removed

    def prune_daily(self, max_age_s: float, now: float | None = None, max_rows: int = 0) -> list["EncoderUsage"] | None:
        """:meth:`prune`, where the cache was not pruned in the last day (None: not due, or off)."""
        now = time.time() if now is None else now
        if max_age_s <= 0 and max_rows <= 0:
            return None
        with self._connect() as db:
            row = db.execute("SELECT value FROM cache_state WHERE name = 'pruned'").fetchone()
        if row is not None and now - row[0] < 86_400:
            return None
        return self.prune(max_age_s, now, max_rows=max_rows)

    def size_bytes(self) -> int:
        """The cache's files on disk (the database and its write-ahead log)."""
        total = 0
        for suffix in ("", "-wal", "-shm"):
            try:
                total += Path(f"{self.path}{suffix}").stat().st_size
            except OSError:
                pass
        return total


@dataclass(frozen=True)
class EncoderUsage:
    encoder: str
    rows: int
    used: float | None
    reason: str | None = None  # of rows removed: "unused" (the encoder, for CACHE_MAX_AGE_DAYS) or "cap"

    def to_dict(self) -> dict:
        when = None
        if self.used is not None:
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.used))
        return {"encoder": self.encoder, "rows": self.rows, "last_used": when,
                **({"reason": self.reason} if self.reason else {})}
