"""Versioned model folders per project, with an atomically switched ``current`` pointer.

Layout under ``MODEL_DIR``::

    projects/<project key>/
        current                  # one line: the served version's name
        versions/<name>/         # immutable once renamed into place
            meta.json            # version, number, project, parent, created_at, encoder,
                                 # plan signature, controls (labels, temperature, ...), metrics
            heads.safetensors    # <control>.weight (labels x dim), <control>.bias (labels);
                                 # a Labels control's token head: (BIO tags x dim), meta "head": "token"
            encoder/             # only when this version fine-tuned the encoder
        .lock                    # flock(2) lock file for writers of this project

Version names are ``p<project id>-v<N>``, N monotonic per project (``v0`` = cold
start).  A version folder is written under a temporary name in ``versions/`` and
renamed into place; ``current`` is replaced with ``os.replace``.  Readers never see
a half-written version: a folder without ``meta.json`` or with an unreadable one is
ignored.  Everything is plain files and ``rename``, so several machines can share
the folder (a shared volume).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import numpy as np
from safetensors.numpy import load_file, save_file

from .embeddings import weights_stamp
from .settings import WEIGHT_FILES, has_weights
from .model import ClassifierHead, Encoder, heads_for_plan
from .ner import TokenHead

if TYPE_CHECKING:
    from .labeling import LabelingPlan
    from .settings import Settings

log = logging.getLogger(__name__)

_KEY_SAFE = re.compile(r"[^A-Za-z0-9_.-]")
_VERSION = re.compile(r"^(?P<prefix>.+)-v(?P<number>\d+)$")


def is_version_name(version: str) -> bool:
    """Whether ``version`` is a name as this registry writes them (p3-v2); anything else (a NUL, a
    lone surrogate, a name longer than a file name may be) would fail in the file system instead."""
    return not ("/" in version or version.startswith(".") or len(version) > 200 or not version.isprintable()
                or not _VERSION.match(version))


class RegistryError(RuntimeError):
    pass


def safe_key(project_key: str) -> str:
    """A project key made safe as one path component."""
    key = _KEY_SAFE.sub("_", str(project_key).strip())[:120]
    if not key or key.strip(".") == "":
        raise RegistryError(f"unusable project key {project_key!r}")
    if key.startswith("."):
        key = "_" + key[1:]
    return key


def version_prefix(project_key: str) -> str:
    head = str(project_key).split(".", 1)[0]
    return f"p{head}" if head.isdecimal() else f"p{safe_key(project_key)}"


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class VersionInfo:
    name: str
    number: int
    path: Path
    meta: dict


@dataclass
class LoadedHeads:
    version: str
    meta: dict
    heads: dict[str, ClassifierHead]
    encoder_path: str | None  # a fine-tuned encoder folder, or None for the base encoder


def built_on_other_base(loaded: LoadedHeads, base_path: str, base_dim: int) -> str | None:
    """Why ``loaded`` was built on another base model than ``base_path`` (``BASE_MODEL`` now, of
    ``base_dim``-dimension embeddings), or None where it was not (or nothing says).  Its meta's
    ``base_stamp`` (the fingerprint of the base model's files when it was written) differs from the
    files there now; or, for a version written before stamps were kept, one of its heads over the
    base encoder reads embeddings of another width.  Its rows mean nothing to the new encoder."""
    stamp = loaded.meta.get("base_stamp")
    if stamp:
        now = weights_stamp(base_path)
        if now and now != stamp:
            return (f"built on another base model ({loaded.meta.get('base_model')}, files {stamp}); "
                    f"BASE_MODEL is {base_path} (files {now})")
        return None
    if loaded.encoder_path is None:
        for name, head in sorted(loaded.heads.items()):
            width = int(head.weight.shape[-1])
            if width != base_dim:
                return (f"its head {name!r} reads {width}-dimension embeddings, and BASE_MODEL ({base_path}) "
                        f"gives {base_dim}")
    return None


ABANDONED_AFTER_S = 3600  # a version being written where no file changed for this long has no writer left


def abandoned_write(folder: Path, now: float | None = None) -> bool:
    """Whether ``folder`` (a ``.tmp-*`` version being written) was left by a writer that is gone:
    no file in it changed for ``ABANDONED_AFTER_S`` (a writer saves its encoder without a pause,
    and the rest takes milliseconds; its process id would not tell, as containers sharing the
    folder each number their own)."""
    newest = 0.0
    try:
        for root, _dirs, files in os.walk(folder):
            for name in [".", *files]:
                newest = max(newest, os.stat(os.path.join(root, name)).st_mtime)
    except OSError:
        return False  # renamed into place or removed meanwhile
    return (now or time.time()) - newest > ABANDONED_AFTER_S


def encoder_folder_problem(folder: Path) -> str | None:
    """What a fine-tuned encoder's folder lacks of what ``save_encoder`` writes (its config, a
    weights file, its tokenizer's config), or None; a few file-system lookups, no loading."""
    if not folder.is_dir():
        return "is missing"
    if not (folder / "config.json").is_file():
        return "has no config.json"
    if not has_weights(folder):
        return f"has no {' or '.join(WEIGHT_FILES)}"
    if not (folder / "tokenizer_config.json").is_file():
        return "has no tokenizer_config.json"
    return None


class ModelRegistry:
    def __init__(self, model_dir: Path | str):
        self.root = Path(model_dir)
        self.projects_dir = self.root / "projects"

    # -- paths ---------------------------------------------------------------------
    def project_dir(self, project_key: str) -> Path:
        return self.projects_dir / safe_key(project_key)

    def versions_dir(self, project_key: str) -> Path:
        return self.project_dir(project_key) / "versions"

    def version_dir(self, project_key: str, version: str) -> Path:
        if not is_version_name(version):
            raise RegistryError(f"bad version name {version[:80]!r}: expected a name such as p3-v2")
        return self.versions_dir(project_key) / version

    @contextlib.contextmanager
    def lock(self, project_key: str, name: str = ".lock") -> Iterator[None]:
        """An exclusive lock for one project (across processes): its version writers by default,
        or another kind of work with its own lock file ``name``."""
        directory = self.project_dir(project_key)
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / name, "a+") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    # -- reading -------------------------------------------------------------------
    def projects(self) -> list[str]:
        if not self.projects_dir.is_dir():
            return []
        return sorted(p.name for p in self.projects_dir.iterdir() if p.is_dir() and not p.name.startswith("."))

    def current(self, project_key: str) -> str | None:
        try:
            name = (self.project_dir(project_key) / "current").read_text().strip()
        except FileNotFoundError:
            return None
        return name or None

    def has_meta(self, project_key: str, version: str) -> bool:
        """Whether ``version``'s folder still holds its meta.json (one lookup, no reading)."""
        try:
            return (self.version_dir(project_key, version) / "meta.json").is_file()
        except RegistryError:
            return False

    def meta(self, project_key: str, version: str) -> dict:
        path = self.version_dir(project_key, version) / "meta.json"
        try:
            meta = json.loads(path.read_text())
        except FileNotFoundError:
            raise RegistryError(f"version {version} of project {project_key} does not exist") from None
        except ValueError as exc:  # torn or edited by hand: say which file
            raise RegistryError(f"version {version} of project {project_key} has an unreadable meta.json "
                                f"({path}: {exc})") from None
        if not isinstance(meta, dict):  # valid JSON, but no version's (a file written over by hand)
            raise RegistryError(f"version {version} of project {project_key} has an unreadable meta.json "
                                f"(a JSON {type(meta).__name__}, not an object)")
        return meta

    def versions(self, project_key: str) -> list[VersionInfo]:
        directory = self.versions_dir(project_key)
        if not directory.is_dir():
            return []
        found = []
        for path in directory.iterdir():
            match = _VERSION.match(path.name)
            if not match or not path.is_dir():
                continue
            try:
                meta = json.loads((path / "meta.json").read_text())
            except (OSError, ValueError):
                continue
            if not isinstance(meta, dict):
                continue
            found.append(VersionInfo(path.name, int(match["number"]), path, meta))
        return sorted(found, key=lambda v: v.number)

    def load(self, project_key: str, version: str) -> LoadedHeads:
        directory = self.version_dir(project_key, version)
        meta = self.meta(project_key, version)
        tensors = load_file(str(directory / "heads.safetensors")) if meta.get("controls") else {}
        heads = {}
        for name, control_meta in meta.get("controls", {}).items():
            # a token head (Labels) says so; anything else is a classification head (Choices)
            kind = TokenHead if control_meta.get("head") == "token" else ClassifierHead
            retired = {"retired_weight": tensors[f"{name}.retired_weight"], "retired_bias": tensors[f"{name}.retired_bias"]} \
                if kind is TokenHead and f"{name}.retired_weight" in tensors else {}
            heads[name] = kind.from_meta(control_meta, tensors[f"{name}.weight"], tensors[f"{name}.bias"], **retired)
        encoder_path = None
        if meta.get("encoder"):
            encoder_path = str(self.version_dir(project_key, meta["encoder"]) / "encoder")
            problem = encoder_folder_problem(Path(encoder_path))
            if problem is not None:  # removed or half-copied by hand: no job, worker or rollback can use it
                raise RegistryError(f"version {version} of project {project_key}: its encoder folder "
                                    f"{encoder_path} {problem}")
        return LoadedHeads(version=version, meta=meta, heads=heads, encoder_path=encoder_path)

    # -- writing -------------------------------------------------------------------
    def _next_number(self, project_key: str) -> int:
        numbers = [v.number for v in self.versions(project_key)]
        directory = self.versions_dir(project_key)
        if directory.is_dir():  # also count folders whose meta is unreadable: names are never reused
            for path in directory.iterdir():
                match = _VERSION.match(path.name)
                if match:
                    numbers.append(int(match["number"]))
        # and versions whose folder was removed since: a web worker that served one compares by name
        for entry in self.history(project_key):
            match = _VERSION.match(str(entry.get("version") or ""))
            if match:
                numbers.append(int(match["number"]))
        return max(numbers) + 1 if numbers else 0

    def given(self, project_key: str) -> set[str]:
        """Every version name given for the project here: folders, and names noted in the history
        (reserved ones too)."""
        names = {str(entry["version"]) for entry in self.history(project_key)
                 if entry.get("event") in ("created", "reserved") and entry.get("version")}
        return names | {info.name for info in self.versions(project_key)}

    def renumber_past(self, project_key: str, version: str, taken: int, reason: str) -> str:
        """Reserve every name up to ``p<id>-v<taken>`` (taken elsewhere: Label Studio holds
        predictions of another install's versions under them) and serve ``version`` again under
        the next free name: the same heads, and the same encoder folder.  Returns the new name."""
        with self.lock(project_key):
            self._note(project_key, {"event": "reserved", "version": f"{version_prefix(project_key)}-v{taken}",
                                     "reason": reason})
            loaded = self.load(project_key, version)
            meta = {k: v for k, v in loaded.meta.items() if k not in ("version", "number", "created_at", "controls")}
            meta.update(parent=version, kind="renumbered", renumbered_from=version)
            name = self.create_version(project_key, loaded.heads, meta)
            self.promote(project_key, name, reason=f"renumbered: {reason}")
            if self.pinned(project_key) == version:
                write_atomic(self.project_dir(project_key) / "pinned", (name + "\n").encode())
        return name

    def create_version(
        self,
        project_key: str,
        heads: dict[str, ClassifierHead],
        meta: dict,
        write_encoder: Callable[[Path], None] | None = None,
    ) -> str:
        """Write a new immutable version and return its name (it is not made current).

        ``write_encoder(folder)``, when given, saves a fine-tuned encoder into
        ``folder``; otherwise ``meta["encoder"]`` may name an earlier version whose
        encoder this one shares (None: the base encoder).
        """
        versions = self.versions_dir(project_key)
        versions.mkdir(parents=True, exist_ok=True)
        self.sweep_abandoned(project_key)
        tmp = versions / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            tensors: dict[str, np.ndarray] = {}
            controls = {}
            for name, head in heads.items():
                tensors[f"{name}.weight"] = np.ascontiguousarray(head.weight, dtype=np.float32)
                tensors[f"{name}.bias"] = np.ascontiguousarray(head.bias, dtype=np.float32)
                if getattr(head, "retired", None):  # a token head's removed labels (``TokenHead.fold``)
                    tensors[f"{name}.retired_weight"] = np.ascontiguousarray(head.retired_weight, dtype=np.float32)
                    tensors[f"{name}.retired_bias"] = np.ascontiguousarray(head.retired_bias, dtype=np.float32)
                controls[name] = head.to_meta()
            if tensors:
                save_file(tensors, str(tmp / "heads.safetensors"))
            if write_encoder is not None:
                write_encoder(tmp / "encoder")
            floor = 0  # past every name this writer found taken: its listing may lag behind (a shared folder)
            for attempt in range(1000):
                number = max(self._next_number(project_key), floor)
                name = f"{version_prefix(project_key)}-v{number}"
                body = dict(meta)
                body.update(
                    version=name,
                    number=number,
                    project=project_key,
                    created_at=body.get("created_at") or time.time(),
                    controls=controls,
                )
                if write_encoder is not None:  # a stamp of its own: the name alone recurs (see encoder_id)
                    body.update(encoder=name, encoder_stamp=uuid.uuid4().hex[:12])
                write_atomic(tmp / "meta.json", json.dumps(body, indent=2, sort_keys=True).encode())
                try:
                    os.rename(tmp, versions / name)  # fails if another writer took the name
                except OSError as exc:
                    if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise  # not a name collision: another name would not help
                    floor = number + 1
                    continue
                self._note(project_key, {"event": "created", "version": name})  # its name is never given again
                log.info("project %s: wrote version %s", project_key, name)
                return name
            raise RegistryError(f"could not allocate a version name for {project_key}")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def sweep_abandoned(self, project_key: str) -> list[str]:
        """Remove the half-written versions whose writer is gone (killed mid-write: a lost machine,
        SIGKILL, a container stopped; each holds a whole encoder), and return their names."""
        removed = []
        directory = self.versions_dir(project_key)
        for folder in directory.glob(".tmp-*") if directory.is_dir() else ():
            if abandoned_write(folder):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder.name)
        if removed:
            log.warning("project %s: removed %d version(s) whose writer died mid-write: %s", project_key,
                        len(removed), ", ".join(removed))
        return removed

    def promote(self, project_key: str, version: str, reason: str = "promoted", away_from: str | None = None) -> None:
        """Make ``version`` the served one (an atomic pointer switch), and note it in the history;
        ``away_from``: a rollback's version, which a later rollback passes over."""
        self.meta(project_key, version)  # must exist and be complete
        write_atomic(self.project_dir(project_key) / "current", (version + "\n").encode())
        entry = {"event": "current", "version": version, "reason": reason}
        if away_from:
            entry["away_from"] = away_from
        self._note(project_key, entry)
        log.info("project %s: current version is now %s (%s)", project_key, version, reason)

    # -- history, pinning, rollback ------------------------------------------------------
    def _note(self, project_key: str, entry: dict) -> None:
        line = (json.dumps(dict(entry, at=time.time()), sort_keys=True) + "\n").encode()
        with open(self.project_dir(project_key) / "history.jsonl", "ab+") as handle:
            if handle.seek(0, os.SEEK_END) > 0:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":  # a torn last line (a crash mid-write): this entry starts its own
                    line = b"\n" + line
            handle.write(line)  # one short append

    def history(self, project_key: str) -> list[dict]:
        """Every version written, every switch of ``current`` and every pin change, oldest first."""
        try:
            lines = (self.project_dir(project_key) / "history.jsonl").read_text().splitlines()
        except FileNotFoundError:
            return []
        entries = []
        for line in lines:
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue  # a torn last line after a crash
        return entries

    def _switches(self, project_key: str) -> tuple[list[dict], set[str]]:
        """The history's switches of ``current``, oldest first, and the versions an operator rolled
        back away from (with the models they re-shape) and did not make current again since."""
        switches = [e for e in self.history(project_key) if e.get("event") == "current" and e.get("version")]
        rejected: set[str] = set()
        for entry in switches:
            away = entry.get("away_from")
            if away is None and str(entry.get("reason", "")).startswith("rollback from "):
                away = entry["reason"][len("rollback from "):]  # noted before away_from existed
            if away:
                rejected |= self._same_model(project_key, away)
            rejected.discard(entry["version"])
        return switches, rejected

    def stand_ins(self, project_key: str, extra: Iterable[str] = ()) -> list[str]:
        """What serves while ``current`` is missing or unreadable, in order: the versions that
        served, most recent first, except those an operator rolled back away from; then ``extra``
        (what a process served last); then those rolled back away from; then every other version,
        newest first, those the gate refused last (without a history, e.g. a folder copied without
        ``history.jsonl``, the newest was a refused one as often as not).  The same in every
        process: a web worker, a job and a refresh agree."""
        switches, rejected = self._switches(project_key)
        served = list(dict.fromkeys(e["version"] for e in reversed(switches)))
        order = [v for v in served if v not in rejected] + list(extra) + [v for v in served if v in rejected]
        every = list(reversed(self.versions(project_key)))
        refused = {v.name for v in every if (v.meta.get("decision") or {}).get("promoted") is False}
        order += [v.name for v in every if v.name not in refused] + [v.name for v in every if v.name in refused]
        return list(dict.fromkeys(order))

    def readable_current(self, project_key: str, skip: Iterable[str] = (), extra: Iterable[str] = ()) -> LoadedHeads | None:
        """The current version, or where its pointer is missing, names a version that is gone or
        unreadable, or one in ``skip``, the first readable of :meth:`stand_ins`: a broken pointer
        costs a served model, never a cold start over a trained one.  None: no readable version."""
        skip = set(skip)
        current = self.current(project_key)
        if current is not None and current not in skip:
            try:
                return self.load(project_key, current)
            except Exception:
                log.exception("project %s: current version %s is unreadable", project_key, current)
        for version in self.stand_ins(project_key, extra):
            if version == current or version in skip:
                continue
            try:
                loaded = self.load(project_key, version)
            except Exception:
                log.warning("project %s: version %s is unreadable too", project_key, version, exc_info=True)
                continue
            log.warning("project %s: %s stands in for the current version (%s), which is missing or unreadable",
                        project_key, version, current)
            return loaded
        return None

    def _served_before(self, project_key: str, current: str | None) -> str | None:
        """The version that served before ``current`` last became current, passing over the
        versions an operator rolled back away from (unless one was made current again later), so
        that rollback after rollback walks back, and a rollback after a rolled-back-to version was
        followed by a new one returns to the version the operator chose."""
        switches, rejected = self._switches(project_key)
        last = max((i for i, e in enumerate(switches) if e["version"] == current), default=len(switches))
        existing = {v.name for v in self.versions(project_key)}
        skip = self._same_model(project_key, current) if current else set()
        for entry in reversed(switches[:last]):
            version = entry["version"]
            if version not in skip and version not in rejected and version in existing:
                if self._loadable(project_key, version) is None:
                    return version
                skip.add(version)  # (its heads would not load: the one before it)
        return None

    def _loadable(self, project_key: str, version: str) -> str | None:
        """Why ``version``'s heads do not load, or None when they do."""
        try:
            self.load(project_key, version)
        except Exception as exc:  # a damaged or missing file: whatever the reader raises
            return f"{type(exc).__name__}: {exc}"
        return None

    def served_version(self, project_key: str) -> str | None:
        """The version that serves: the current one, or its stand-in where the pointer is missing
        or names a version that does not load (as the web workers, jobs and refreshes take it)."""
        served = self.readable_current(project_key)
        return served.version if served is not None else self.current(project_key)

    def _must_load(self, project_key: str, version: str, action: str) -> None:
        self.meta(project_key, version)  # no such version: RegistryError naming it
        problem = self._loadable(project_key, version)
        if problem is not None:
            raise RegistryError(f"project {project_key}: version {version} does not load ({problem}); not {action}")

    def _same_model(self, project_key: str, version: str) -> set[str]:
        """``version`` and the versions it re-shapes: a label config change writes the served model
        again with the new label set (``write_plan_version``), so rolling back from the re-shaped
        version must not land on the model it was made from (which the next request would re-shape
        straight back); a renumbered copy (``renumber_past``) is its original's model too."""
        names: set[str] = set()
        while version and version not in names:
            names.add(version)
            try:
                meta = self.meta(project_key, version)
            except (RegistryError, OSError, ValueError):
                break
            version = meta.get("parent") if meta.get("kind") in ("config-change", "renumbered") else None
        return names

    def pinned(self, project_key: str) -> str | None:
        try:
            return (self.project_dir(project_key) / "pinned").read_text().strip() or None
        except FileNotFoundError:
            return None

    def pin(self, project_key: str, version: str | None = None) -> str:
        """Pin the project to ``version`` (default: the current one): no automatic promotion until unpinned."""
        with self.lock(project_key):
            version = version or self.served_version(project_key)
            if not version:
                raise RegistryError(f"project {project_key} has no version to pin")
            self._must_load(project_key, version, "pinned")
            if self.current(project_key) != version:
                self.promote(project_key, version, reason="pinned")
            write_atomic(self.project_dir(project_key) / "pinned", (version + "\n").encode())
            self._note(project_key, {"event": "pin", "version": version})
        return version

    def unpin(self, project_key: str) -> None:
        with self.lock(project_key):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.project_dir(project_key) / "pinned")
            self._note(project_key, {"event": "unpin"})

    def rollback(self, project_key: str, to: str | None = None, pin: bool = False) -> str:
        """Serve ``to``, or the version that was current before the current one.

        A pinned project moves its pin along (the operator chose this version); ``pin`` pins it
        in the same hold of the lock (a job's promotion cannot come in between)."""
        with self.lock(project_key):
            current = self.served_version(project_key)  # (what serves where the pointer is missing or broken)
            if not to:  # (an empty name, as pin takes it: the default)
                to = self._served_before(project_key, current)
                if to is None:
                    raise RegistryError(f"project {project_key}: no earlier served version to roll back to")
            self._must_load(project_key, to, "rolled back to")
            self.promote(project_key, to, reason=f"rollback from {current}", away_from=current)
            if pin or self.pinned(project_key):
                write_atomic(self.project_dir(project_key) / "pinned", (to + "\n").encode())
            if pin:
                self._note(project_key, {"event": "pin", "version": to})
        return to

    #: how far back a re-shape looks for a returning label's learned row
    RECALL_DEPTH = 50

    def learned_rows(self, project_key: str, parent: LoadedHeads) -> dict[str, dict[str, tuple]]:
        """Per Choices control, the learned ``(row, bias, multiple)`` of each label in ``parent``'s
        line of versions (``parent`` first, then its parents), nearest first, while they read the
        same encoder (a row means nothing to other weights); unreadable versions end the walk."""
        def reads(meta: dict) -> tuple:
            return meta.get("encoder"), meta.get("encoder_stamp"), meta.get("base_model")

        found: dict[str, dict[str, tuple]] = {}
        same, version, seen = reads(parent.meta), parent, set()
        while version is not None and version.version not in seen and len(seen) < self.RECALL_DEPTH:
            seen.add(version.version)
            if reads(version.meta) != same:
                break
            for name, head in version.heads.items():
                if isinstance(head, ClassifierHead) and head.trained:
                    rows = found.setdefault(name, {})
                    for i, label in enumerate(head.labels):
                        if label not in head.zero_shot_rows and label not in rows:
                            rows[label] = (head.weight[i], float(head.bias[i]), head.multiple)
            above = version.meta.get("parent")
            try:
                version = self.load(project_key, above) if above else None
            except (RegistryError, OSError, ValueError, KeyError):
                version = None
        return found

    def write_plan_version(
        self, project_key: str, plan: "LabelingPlan", parent: LoadedHeads | None, encoder: Encoder, settings: "Settings"
    ) -> LoadedHeads:
        """Write and promote the cold start (no parent) or ``parent`` re-shaped to a changed
        label config: learned rows kept, new labels zero-shot, removed labels dropped.  A label
        that comes back (removed, then added again; or a request that still carried the older
        config) gets the row an earlier version of the same encoder learned for it, not a
        zero-shot one: what was learned is not lost to a config that went back and forth."""
        heads = heads_for_plan(
            plan,
            parent.heads if parent else {},
            encoder,
            settings.zero_shot_template,
            settings.zero_shot_temperature,
            settings.multi_label_threshold,
            recall=self.learned_rows(project_key, parent) if parent else None,
        )
        meta = {
            "parent": parent.version if parent else None,
            "kind": "config-change" if parent else "cold-start",
            "encoder": parent.meta.get("encoder") if parent else None,
            "encoder_stamp": parent.meta.get("encoder_stamp") if parent else None,
            "base_model": settings.encoder_path,
            "base_stamp": weights_stamp(settings.encoder_path),
            "plan_signature": plan.signature,
            "plan": [c.signature() for c in plan.controls],
            "label_config": plan.config,
            "metrics": {},
        }
        name = self.create_version(project_key, heads, meta)
        self.promote(project_key, name, reason=meta["kind"])
        if self.pinned(project_key):  # the label config changed under a pin: the pin follows
            write_atomic(self.project_dir(project_key) / "pinned", (name + "\n").encode())
        return self.load(project_key, name)
