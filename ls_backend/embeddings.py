"""A cache of sentence embeddings keyed by (encoder id, text hash), so a head refit never re-encodes.

One SQLite file per machine and ``MODEL_DIR`` (``CACHE_DIR``, by default under ``~/.cache``, never on
the possibly shared ``MODEL_DIR``: SQLite does not belong on a network share): a cache, not a source
of truth — several machines sharing the registry each keep their own, and a miss only costs an encode.
The encoder id names the weights: ``base:<path>`` for the base encoder, or the project and version
that hold a fine-tuned ``encoder/`` folder, with the stamp the registry gave those weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .model import Encoder


def encoder_id(meta: dict, base_path: str, encoder: Encoder) -> str:
    """The name of the weights a version's embeddings come from, and their precision: the project
    and version that hold its fine-tuned ``encoder/`` folder (``meta["encoder"]``) with the stamp
    the registry gave those weights when it wrote them, else ``base:<path>``; ``@bf16``/``@fp16``
    where the encoder serves in that precision.  Version names carry only Label Studio's project
    id, so two projects of one id (two Label Studio instances, a re-created database) or a project
    whose folder was removed and trained again would otherwise read each other's embeddings."""
    name = f"base:{base_path}"
    if meta.get("encoder"):
        stamp = meta.get("encoder_stamp")
        name = f"{meta.get('project', '')}/{meta['encoder']}" + (f":{stamp}" if stamp else "")
    return name if encoder.precision_tag == "fp32" else f"{name}@{encoder.precision_tag}"


def text_key(text: str, max_length: int) -> str:
    return hashlib.sha1(f"{max_length}\x00{text}".encode("utf-8", "surrogatepass")).hexdigest()


class EmbeddingCache:
    def __init__(self, cache_dir: Path | str):
        self.path = Path(cache_dir) / "embeddings.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS embeddings (encoder TEXT NOT NULL, key TEXT NOT NULL, "
                "vector BLOB NOT NULL, PRIMARY KEY (encoder, key))"
            )

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            yield db
            db.commit()
        finally:
            db.close()

    def encode(self, encoder: Encoder, encoder_id: str, texts: Sequence[str], batch_size: int = 32) -> tuple[np.ndarray, int]:
        """Embeddings of ``texts`` (cached ones read, the rest encoded and stored); also the miss count."""
        keys = [text_key(t, encoder.max_length) for t in texts]
        found: dict[str, np.ndarray] = {}
        with self._connect() as db:
            unique = list(dict.fromkeys(keys))
            for start in range(0, len(unique), 500):
                chunk = unique[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for key, blob in db.execute(
                    f"SELECT key, vector FROM embeddings WHERE encoder = ? AND key IN ({marks})", [encoder_id, *chunk]
                ):
                    found[key] = np.frombuffer(blob, dtype=np.float32)
        missing = [i for i, key in enumerate(keys) if key not in found]
        if missing:
            first = {}
            for i in missing:
                first.setdefault(keys[i], i)
            order = list(first.values())
            fresh = encoder.encode([texts[i] for i in order], batch_size)
            with self._connect() as db:
                db.executemany(
                    "INSERT OR REPLACE INTO embeddings (encoder, key, vector) VALUES (?, ?, ?)",
                    [(encoder_id, keys[i], fresh[row].astype(np.float32).tobytes()) for row, i in enumerate(order)],
                )
            for row, i in enumerate(order):
                found[keys[i]] = fresh[row]
        out = np.zeros((len(texts), encoder.dim), dtype=np.float32)
        for i, key in enumerate(keys):
            out[i] = found[key]
        return out, len(set(keys[i] for i in missing))
