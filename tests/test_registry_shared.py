"""The model registry as a shared folder: several writer processes (standing in for several machines that
mount the same MODEL_DIR) and readers at once.

What must hold (README, "Registry layout" and "Deploy"):

- version names are unique and monotonic per project, even when two writers race for the same number;
- every listed version is complete (meta, heads and encoder files as written), and so is the one ``current``
  names, at every moment a reader looks;
- a half-written version (a temporary folder, e.g. of a writer killed mid-write) is never listed or served,
  and its number is not taken;
- a writer whose view of the folder lags behind (a shared filesystem's directory cache) still finds a free
  name, and an error that is not a name collision is raised at once, not retried.

Processes are started with ``spawn``, as fresh interpreters (nothing shared but the folder).
"""

from __future__ import annotations

import errno
import hashlib
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from ls_backend.model import ClassifierHead
from ls_backend.registry import ModelRegistry, RegistryError

PROJECT = "7.1700000000"
LABELS = ["World", "Sports", "Business", "Sci/Tech"]


def _heads(writer: int, seq: int) -> dict[str, ClassifierHead]:
    rng = np.random.default_rng(writer * 100_000 + seq)
    return {
        "topic": ClassifierHead(
            labels=list(LABELS),
            weight=rng.standard_normal((len(LABELS), 16)).astype(np.float32),
            bias=rng.standard_normal(len(LABELS)).astype(np.float32),
            trained=True,
        )
    }


def _digest(heads: dict[str, ClassifierHead]) -> str:
    h = hashlib.sha256()
    for name in sorted(heads):
        h.update(np.ascontiguousarray(heads[name].weight, dtype=np.float32).tobytes())
        h.update(np.ascontiguousarray(heads[name].bias, dtype=np.float32).tobytes())
    return h.hexdigest()


def _payload(writer: int, seq: int) -> bytes:
    # large enough that a reader polling the folder could catch a version mid-write, were it visible
    return hashlib.sha256(f"{writer}:{seq}".encode()).digest() * 8192  # 256 KiB


class LaggingRegistry(ModelRegistry):
    """A writer whose listing of ``versions/`` is up to ``lag`` seconds old, as on a shared filesystem
    whose directory cache lags behind the other machines' renames."""

    def __init__(self, model_dir, lag: float):
        super().__init__(model_dir)
        self.lag = lag
        self._seen: tuple[float, int] | None = None

    def _next_number(self, project_key: str) -> int:
        now = time.monotonic()
        if self._seen is None or now - self._seen[0] > self.lag:
            self._seen = (now, super()._next_number(project_key))
        return self._seen[1]


def _writer(model_dir: str, writer: int, count: int, lag: float, start, out) -> None:
    """One writer process: ``count`` versions, each promoted at once (what a training job does)."""
    registry = LaggingRegistry(model_dir, lag) if lag else ModelRegistry(model_dir)
    start.wait(30)
    names = []
    for seq in range(count):
        heads = _heads(writer, seq)
        payload = _payload(writer, seq) if seq % 2 == 0 else None
        meta = {"kind": "test", "writer": writer, "seq": seq, "digest": _digest(heads)}
        writer_fn = None
        if payload is not None:
            meta["payload"] = hashlib.sha256(payload).hexdigest()

            def writer_fn(folder: Path, data: bytes = payload) -> None:
                _encoder_folder(folder)
                with open(folder / "model.safetensors", "wb") as handle:
                    for i in range(0, len(data), 32768):  # in pieces, as save_pretrained writes
                        handle.write(data[i : i + 32768])
                        handle.flush()

        name = registry.create_version(PROJECT, heads, meta, write_encoder=writer_fn)
        registry.promote(PROJECT, name)
        names.append(name)
    out.put((writer, names))


def _encoder_folder(folder: Path) -> None:
    """An encoder folder with the files the registry looks for (a config, weights, a tokenizer's
    config); these tests write the weights' bytes themselves and never load them."""
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer_config.json").write_text("{}")
    (folder / "model.safetensors").touch()


def _stuck_writer(model_dir: str, ready) -> None:
    """Starts a version with a big encoder and never finishes it (killed by the test)."""
    registry = ModelRegistry(model_dir)

    def write_encoder(folder: Path) -> None:
        _encoder_folder(folder)
        (folder / "model.safetensors").write_bytes(b"\0" * 100_000)
        ready.set()
        time.sleep(600)

    registry.create_version(PROJECT, _heads(99, 0), {"kind": "test", "writer": 99}, write_encoder=write_encoder)


def assert_complete(registry: ModelRegistry, name: str) -> dict:
    """The version reads back exactly as its writer wrote it."""
    meta = registry.meta(PROJECT, name)
    assert meta["version"] == name
    assert name.endswith(f"-v{meta['number']}")
    loaded = registry.load(PROJECT, name)
    assert loaded.version == name and set(loaded.heads) == {"topic"}
    if meta.get("kind") == "test" and "digest" in meta:
        assert _digest(loaded.heads) == meta["digest"], f"{name}: heads differ from what was written"
    if meta.get("payload"):
        assert meta["encoder"] == name
        data = (registry.version_dir(PROJECT, name) / "encoder" / "model.safetensors").read_bytes()
        assert hashlib.sha256(data).hexdigest() == meta["payload"], f"{name}: encoder files incomplete"
    return meta


@pytest.mark.parametrize("lag", [0.0, 0.25], ids=["fresh-listing", "lagging-listing"])
def test_two_processes_write_one_project_without_collisions(tmp_path, lag):
    model_dir = tmp_path / "models"
    context = multiprocessing.get_context("spawn")
    start, out = context.Event(), context.Queue()
    count = 24
    writers = [context.Process(target=_writer, args=(str(model_dir), w, count, lag, start, out)) for w in (1, 2)]
    for process in writers:
        process.start()
    registry = ModelRegistry(model_dir)
    time.sleep(0.5)
    start.set()

    # a reader polls while both write: every listed version and the current one are complete
    looks, checked = 0, set()
    deadline = time.monotonic() + 240
    while any(p.is_alive() for p in writers) and time.monotonic() < deadline:
        current = registry.current(PROJECT)
        if current is not None:
            assert_complete(registry, current)
            looks += 1
        for info in registry.versions(PROJECT):
            assert not info.name.startswith("."), f"temporary folder {info.name} listed"
            if info.name not in checked:
                assert_complete(registry, info.name)
                checked.add(info.name)
        time.sleep(0.005)
    results = dict(out.get(timeout=60) for _ in writers)
    for process in writers:
        process.join(30)
        assert process.exitcode == 0, f"a writer process failed (exit code {process.exitcode})"
    assert looks > 0, "the reader never saw a current version while the writers ran"

    # unique names; each writer's own names increase; together they are v0..v(2n-1), none reused or skipped
    created = results[1] + results[2]
    assert len(created) == len(set(created)) == 2 * count
    for names in results.values():
        numbers = [int(n.rsplit("-v", 1)[1]) for n in names]
        assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    listed = registry.versions(PROJECT)
    assert [v.name for v in listed] == [f"p7-v{i}" for i in range(2 * count)]
    assert {v.name for v in listed} == set(created)
    for info in listed:
        assert_complete(registry, info.name)
    # the last promotion wins, and it names a complete version written by one of the two
    assert registry.current(PROJECT) in {results[1][-1], results[2][-1]}
    # nothing half-written is left behind
    leftovers = [p.name for p in registry.versions_dir(PROJECT).iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_a_writer_killed_mid_write_leaves_nothing_listed_or_served(tmp_path):
    model_dir = tmp_path / "models"
    registry = ModelRegistry(model_dir)
    first = registry.create_version(PROJECT, _heads(0, 0), {"kind": "test", "digest": _digest(_heads(0, 0))})
    registry.promote(PROJECT, first)

    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    stuck = context.Process(target=_stuck_writer, args=(str(model_dir), ready))
    stuck.start()
    try:
        assert ready.wait(120), "the stuck writer never started writing"
        temporary = [p for p in registry.versions_dir(PROJECT).iterdir() if p.name.startswith(".")]
        assert len(temporary) == 1 and (temporary[0] / "encoder" / "model.safetensors").exists()
        # mid-write: not listed, not current, its would-be number not taken
        assert [v.name for v in registry.versions(PROJECT)] == [first]
        assert registry.current(PROJECT) == first
    finally:
        stuck.kill()
        stuck.join(30)
    # after the crash the half-written folder stays for now (nobody renames it into place), invisible
    assert any(p.name.startswith(".tmp-") for p in registry.versions_dir(PROJECT).iterdir())
    assert [v.name for v in registry.versions(PROJECT)] == [first]
    assert registry.projects() == [PROJECT]
    second = registry.create_version(PROJECT, _heads(0, 1), {"kind": "test", "digest": _digest(_heads(0, 1))})
    assert second == "p7-v1"
    assert_complete(registry, second)
    # a write nothing has touched for an hour has no writer left: the next write removes it (each
    # killed attempt of a job left a whole encoder behind, until the disk was full)
    (left,) = [p for p in registry.versions_dir(PROJECT).iterdir() if p.name.startswith(".tmp-")]
    assert registry.sweep_abandoned(PROJECT) == []  # written a moment ago: it may be a live writer's
    hour_ago = time.time() - 3700
    for path in [left, *left.rglob("*")]:
        os.utime(path, (hour_ago, hour_ago))
    registry.create_version(PROJECT, _heads(0, 2), {"kind": "test"})
    assert not left.exists() and [v.name for v in registry.versions(PROJECT)] == [first, second, "p7-v2"]


def test_a_version_folder_without_meta_is_never_listed_nor_its_number_reused(tmp_path):
    """A folder under a version's name without a readable meta.json (a partial copy onto the share, say)."""
    registry = ModelRegistry(tmp_path / "models")
    registry.create_version(PROJECT, _heads(0, 0), {"kind": "test"})
    partial = registry.versions_dir(PROJECT) / "p7-v1"
    partial.mkdir()
    (partial / "heads.safetensors").write_bytes(b"partial")
    (partial / "meta.json").write_text('{"version": "p7-v1", "num')  # torn
    assert [v.name for v in registry.versions(PROJECT)] == ["p7-v0"]
    with pytest.raises((RegistryError, ValueError)):
        registry.promote(PROJECT, "p7-v1")
    assert registry.current(PROJECT) is None
    assert registry.create_version(PROJECT, _heads(0, 1), {"kind": "test"}) == "p7-v2"


def test_a_writer_with_a_stale_listing_still_finds_the_next_free_name(tmp_path):
    """Another machine's versions are on the share, but this writer's listing does not show them yet
    (an NFS client's directory cache can lag by up to a minute): each collision must move the writer on,
    not make it retry the same taken name until it gives up."""
    model_dir = tmp_path / "models"
    other_machine = ModelRegistry(model_dir)
    for seq in range(3):
        other_machine.create_version(PROJECT, _heads(1, seq), {"kind": "test"})

    class Stale(ModelRegistry):
        def _next_number(self, project_key: str) -> int:
            return 0  # the listing from before the other machine wrote anything

    name = Stale(model_dir).create_version(PROJECT, _heads(2, 0), {"kind": "test", "digest": _digest(_heads(2, 0))})
    assert name == "p7-v3"
    assert_complete(other_machine, name)
    assert [v.name for v in other_machine.versions(PROJECT)] == ["p7-v0", "p7-v1", "p7-v2", "p7-v3"]


def test_an_error_that_is_not_a_name_collision_is_raised_at_once(tmp_path, monkeypatch):
    registry = ModelRegistry(tmp_path / "models")
    calls = []

    def refuse(src, dst):
        calls.append(dst)
        raise OSError(errno.EACCES, "Permission denied", str(dst))

    monkeypatch.setattr("ls_backend.registry.os.rename", refuse)
    with pytest.raises(PermissionError):
        registry.create_version(PROJECT, _heads(0, 0), {"kind": "test"})
    assert len(calls) == 1, f"retried {len(calls)} times an error that no other name would fix"
    assert list(registry.versions_dir(PROJECT).iterdir()) == [], "the temporary folder was left behind"


def test_rollback_returns_to_the_version_served_before_and_passes_over_rolled_back_ones(tmp_path):
    registry = ModelRegistry(tmp_path)
    v = {n: registry.create_version(PROJECT, _heads(0, n), {"kind": "test"}) for n in range(1, 6)}
    for n in (1, 2, 3):
        registry.promote(PROJECT, v[n])
    assert registry.rollback(PROJECT) == v[2]
    assert registry.rollback(PROJECT) == v[1]  # rollback after rollback walks back, not to the undone v3
    registry.promote(PROJECT, v[4])  # a job promotes a new version on top of the operator's choice
    assert registry.rollback(PROJECT) == v[1]  # what served before v4, not the rolled-back v2 or v3
    assert registry.rollback(PROJECT, v[3]) == v[3]  # the operator takes v3 back on purpose
    registry.promote(PROJECT, v[5])
    assert registry.rollback(PROJECT) == v[3]
    with pytest.raises(RegistryError, match="no earlier served version"):
        ModelRegistry(tmp_path / "other").rollback("8.1")


def test_an_entry_after_a_torn_history_line_is_kept_and_no_name_is_given_twice(tmp_path):
    """A crash mid-append leaves history.jsonl ending in part of a line: the next entry starts a
    line of its own (glued on, it was lost too, and the name it noted could be given again)."""
    registry = ModelRegistry(tmp_path)
    registry.promote(PROJECT, registry.create_version(PROJECT, _heads(0, 0), {"kind": "cold-start"}))
    with open(registry.project_dir(PROJECT) / "history.jsonl", "a") as handle:
        handle.write('{"event": "current", "versi')
    kept = registry.create_version(PROJECT, _heads(0, 1), {"kind": "fine-tune"})  # not promoted
    assert {"event": "created", "version": kept}.items() <= registry.history(PROJECT)[-1].items()
    shutil.rmtree(registry.version_dir(PROJECT, kept))  # an operator removes it
    assert registry.create_version(PROJECT, _heads(0, 2), {"kind": "fine-tune"}) != kept


def test_a_renumbered_copy_of_the_cold_start_is_listed_as_promoted(tmp_path):
    """Version names another install gave in Label Studio: the serving version is issued again past
    them (``renumber_past``); the listing showed that copy, current, as not promoted."""
    from ls_backend.commands import version_rows
    from ls_backend.settings import Settings

    registry = ModelRegistry(tmp_path)
    v0 = registry.create_version(PROJECT, _heads(0, 0), {"kind": "cold-start"})
    registry.promote(PROJECT, v0)
    copy = registry.renumber_past(PROJECT, v0, 5, "renumbered past p7-v5")
    rows = {row["version"]: row for row in version_rows(Settings(model_dir=tmp_path), PROJECT)}
    assert registry.current(PROJECT) == copy and rows[copy]["current"] and rows[copy]["promoted"]


def test_without_a_history_the_stand_in_is_no_version_the_gate_refused(tmp_path):
    registry = ModelRegistry(tmp_path)
    v0 = registry.create_version(PROJECT, _heads(0, 0), {"kind": "cold-start"})
    v1 = registry.create_version(PROJECT, _heads(0, 1), {"kind": "fine-tune", "decision": {"promoted": True}})
    v2 = registry.create_version(PROJECT, _heads(0, 2), {"kind": "fine-tune", "decision": {"promoted": False}})
    for version in (v0, v1):
        registry.promote(PROJECT, version)
    for name in ("current", "history.jsonl"):  # a folder copied without them
        (registry.project_dir(PROJECT) / name).unlink()
    assert registry.stand_ins(PROJECT) == [v1, v0, v2]
    assert registry.readable_current(PROJECT).version == v1


def test_rollback_and_pin_never_land_on_a_version_whose_heads_do_not_load(tmp_path):
    """A version whose meta.json reads but whose heads file is damaged: rollback passes over it
    (to the one served before it), and naming it is refused; before, both answered that it was
    current while a stand-in served."""
    registry = ModelRegistry(tmp_path)
    v = [registry.create_version(PROJECT, _heads(0, n), {"kind": "test"}) for n in range(3)]
    for version in v:
        registry.promote(PROJECT, version)
    (registry.version_dir(PROJECT, v[1]) / "heads.safetensors").write_bytes(b"torn")
    for refused in (lambda: registry.rollback(PROJECT, v[1]), lambda: registry.pin(PROJECT, v[1])):
        with pytest.raises(RegistryError, match=f"{v[1]} does not load"):
            refused()
        assert registry.current(PROJECT) == v[2] and registry.pinned(PROJECT) is None
    assert registry.rollback(PROJECT) == v[0] == registry.readable_current(PROJECT).version
    # rollback --pin: one hold of the lock, the switch then the pin (no promotion can come between)
    assert registry.rollback(PROJECT, v[2], pin=True) == v[2] == registry.pinned(PROJECT)
    assert [(e["event"], e["version"]) for e in registry.history(PROJECT)[-2:]] == [("current", v[2]), ("pin", v[2])]


def test_a_version_whose_encoder_folder_is_incomplete_is_no_version_to_serve_train_or_pin(tmp_path):
    """An encoder folder removed or cut short by hand: its heads read, so the registry called the
    version current while every web worker served a stand-in, and every training job failed on it."""
    registry = ModelRegistry(tmp_path)
    v1 = registry.create_version(PROJECT, _heads(0, 1), {"kind": "test"}, write_encoder=_encoder_folder)
    v2 = registry.create_version(PROJECT, _heads(0, 2), {"kind": "test"}, write_encoder=_encoder_folder)
    v3 = registry.create_version(PROJECT, _heads(0, 3), {"kind": "test", "encoder": v2})  # shares v2's
    for version in (v1, v2, v3):
        registry.promote(PROJECT, version)
    assert registry.load(PROJECT, v3).encoder_path.endswith(f"{v2}/encoder")
    (registry.version_dir(PROJECT, v2) / "encoder" / "model.safetensors").unlink()
    with pytest.raises(RegistryError, match=r"has no \*\.safetensors or pytorch_model"):
        registry.load(PROJECT, v3)
    assert registry.readable_current(PROJECT).version == v1 == registry.served_version(PROJECT)
    for refused in (lambda: registry.pin(PROJECT, v2), lambda: registry.rollback(PROJECT, v3)):
        with pytest.raises(RegistryError, match="does not load"):
            refused()
    shutil.rmtree(registry.version_dir(PROJECT, v1) / "encoder")
    with pytest.raises(RegistryError, match="encoder folder .* is missing"):
        registry.load(PROJECT, v1)


def test_with_the_current_pointer_missing_rollback_and_pin_start_from_the_version_that_serves(tmp_path):
    registry = ModelRegistry(tmp_path)
    v = [registry.create_version(PROJECT, _heads(0, n), {"kind": "test"}) for n in range(3)]
    for version in v:
        registry.promote(PROJECT, version)
    (registry.project_dir(PROJECT) / "current").unlink()
    assert registry.readable_current(PROJECT).version == v[2]  # the stand-in
    assert registry.pin(PROJECT) == v[2] == registry.pinned(PROJECT)
    registry.unpin(PROJECT)
    (registry.project_dir(PROJECT) / "current").unlink()
    assert registry.rollback(PROJECT) == v[1] == registry.current(PROJECT)


def test_rollback_from_a_label_config_change_walks_past_the_model_it_reshaped(tmp_path):
    """A config change serves the current model again with the new labels (kind config-change,
    parent: that model). Rolling back from it must go a step further back: landing on its parent,
    the next request would re-shape that parent straight back, and rollback could never pass it."""
    registry = ModelRegistry(tmp_path)
    v0 = registry.create_version(PROJECT, _heads(0, 0), {"kind": "cold-start"})
    v1 = registry.create_version(PROJECT, _heads(0, 1), {"kind": "fine-tune"})
    v2 = registry.create_version(PROJECT, _heads(0, 2), {"kind": "fine-tune"})
    for version in (v0, v1, v2):
        registry.promote(PROJECT, version)
    reshaped = registry.create_version(PROJECT, _heads(0, 3), {"kind": "config-change", "parent": v2})
    registry.promote(PROJECT, reshaped, reason="config-change")
    assert registry.rollback(PROJECT) == v1
    again = registry.create_version(PROJECT, _heads(0, 4), {"kind": "config-change", "parent": v1})  # the next /setup
    registry.promote(PROJECT, again, reason="config-change")
    assert registry.rollback(PROJECT) == v0  # one step further back, past v1 and past v2 (rolled back from)


def test_fine_tuned_encoders_of_projects_with_one_label_studio_id_have_distinct_cache_ids(tmp_path):
    """Two Label Studio instances (or a re-created database) both have a project 3, and a removed
    project folder trained again starts at v1: the embedding cache must not mix their encoders."""
    from types import SimpleNamespace

    from ls_backend.embeddings import encoder_id

    fp32 = SimpleNamespace(precision_tag="fp32")

    def tuned(registry, key):
        name = registry.create_version(key, _heads(0, 1), {"kind": "test"}, write_encoder=_encoder_folder)
        return registry.meta(key, name)

    registry = ModelRegistry(tmp_path)
    one, other = tuned(registry, "3.1700000000"), tuned(registry, "3.1800000000")
    assert one["version"] == other["version"]  # the same version name ...
    assert encoder_id(one, "base", fp32) != encoder_id(other, "base", fp32)  # ... not the same weights
    shutil.rmtree(registry.project_dir("3.1700000000"))
    again = tuned(registry, "3.1700000000")
    assert again["version"] == one["version"] and encoder_id(again, "base", fp32) != encoder_id(one, "base", fp32)
    # a version that shares its parent's encoder reads the same cache entries
    child = registry.meta("3.1700000000", registry.create_version(
        "3.1700000000", _heads(0, 2), {"kind": "test", "encoder": again["encoder"], "encoder_stamp": again["encoder_stamp"]}))
    assert encoder_id(child, "base", fp32) == encoder_id(again, "base", fp32)
    assert encoder_id({}, "base", fp32) == "base:base|t2"  # no such folder: its path alone (and the tokenization)


def test_base_weights_replaced_at_the_same_path_get_another_cache_id(tmp_path):
    """A package upgrade or a model swapped in a mounted folder keeps BASE_MODEL's path: embeddings
    cached from the old weights must not be read for the new ones."""
    from types import SimpleNamespace

    from ls_backend.embeddings import encoder_id

    fp32 = SimpleNamespace(precision_tag="fp32")
    folder = tmp_path / "encoder"
    folder.mkdir()
    (folder / "config.json").write_text('{"hidden_size": 384}')
    (folder / "model.safetensors").write_bytes(b"old weights")
    before = encoder_id({}, str(folder), fp32)
    assert before.startswith(f"base:{folder}#") and encoder_id({}, str(folder), fp32) == before
    (folder / "model.safetensors").write_bytes(b"new weights, bigger")
    assert encoder_id({}, str(folder), fp32) != before
    os.utime(folder / "model.safetensors", ns=(1, 1))
    touched = encoder_id({}, str(folder), fp32)
    (folder / "config.json").write_text('{"hidden_size": 768}')
    os.utime(folder / "model.safetensors", ns=(1, 1))
    assert encoder_id({}, str(folder), fp32) != touched


def _open_cache(folder, barrier, failures):
    from ls_backend.embeddings import EmbeddingCache

    barrier.wait()
    try:
        cache = EmbeddingCache(folder)
        with cache._connect() as db:
            db.executemany("INSERT OR REPLACE INTO embeddings (encoder, key, vector) VALUES (?, ?, ?)",
                           [("e", f"{os.getpid()}-{i}", b"\0" * 16) for i in range(200)])
    except Exception as exc:  # noqa: BLE001 - reported to the test
        failures.put(f"{type(exc).__name__}: {exc}")


def test_processes_opening_a_new_embedding_cache_together_all_get_it(tmp_path):
    """The first jobs on a fresh machine open the cache at once: none may fail on 'database is locked'."""
    import sqlite3

    context = multiprocessing.get_context("fork")
    for trial in range(4):
        folder = tmp_path / f"cache-{trial}"
        barrier, failures = context.Barrier(6), context.Queue()
        processes = [context.Process(target=_open_cache, args=(folder, barrier, failures)) for _ in range(6)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(60)
        errors = []
        while not failures.empty():
            errors.append(failures.get())
        assert errors == [] and all(p.exitcode == 0 for p in processes), errors
        with sqlite3.connect(folder / "embeddings.sqlite") as db:
            assert db.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0] == 6 * 200
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_version_name_is_never_given_again_after_its_folder_is_removed(tmp_path):
    """A web worker that served p7-v1 compares versions by name: a new p7-v1 after the old one's
    folder was removed would be taken for the one it holds."""
    registry = ModelRegistry(tmp_path)
    first = registry.create_version(PROJECT, _heads(0, 1), {"kind": "test"})
    second = registry.create_version(PROJECT, _heads(0, 2), {"kind": "test"})  # never promoted
    registry.promote(PROJECT, first)
    shutil.rmtree(registry.version_dir(PROJECT, second))
    shutil.rmtree(registry.version_dir(PROJECT, first))
    third = registry.create_version(PROJECT, _heads(0, 3), {"kind": "test"})
    assert third not in (first, second) and third.endswith("-v2")
