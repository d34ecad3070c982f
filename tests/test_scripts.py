"""The set-up scripts, run for real on stand-ins for what they install (no download, seconds each)."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _stub_label_studio(cache: Path) -> None:
    """A virtualenv where ``label-studio`` 1.23.2 is installed as far as the script can tell, whose
    ``label-studio start`` only waits (as a real one does while it migrates)."""
    venv = cache / "label-studio-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    info = site / "label_studio-1.23.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: label-studio\nVersion: 1.23.2\n")
    starter = venv / "bin" / "label-studio"
    starter.write_text("#!/bin/sh\nexec sleep 600\n")
    starter.chmod(0o755)


def _lock_is_free(path: Path) -> bool:
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return True


def _running_in(cache: Path) -> list[int]:
    """The stand-in servers (``sleep``) working in a build folder under ``cache``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "comm").read_text().strip() == "sleep" and \
                    str(cache) in os.readlink(proc / "cwd"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped) counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="flock and /proc: Linux")
def test_a_label_studio_build_killed_hard_leaves_neither_its_lock_nor_its_server(tmp_path):
    """The Label Studio server a build starts inherited the builders' lock: a build killed by SIGKILL
    (a CI timeout, the OOM killer) left that server running and the lock held, and every later
    test run waited 30 minutes for it, then failed."""
    cache = tmp_path / "cache"
    _stub_label_studio(cache)
    env = dict(os.environ, LS_BACKEND_CACHE=str(cache), LS_PYTHON=sys.executable)
    script = str(ROOT / "scripts" / "ensure-label-studio.sh")
    first = subprocess.Popen(["bash", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    servers: list[int] = []
    while time.monotonic() < deadline and not servers:
        servers = _running_in(cache)
        time.sleep(0.2)
    assert servers, "the build never started its Label Studio"
    server = servers[0]
    first.send_signal(signal.SIGKILL)
    first.wait()
    try:
        assert _alive(server)  # SIGKILL runs no trap: the server is left
        # free once the killed script's last short-lived child (a `sleep 1`, a 5 s probe) has ended
        lock, deadline = cache / ".ensure-label-studio.lock", time.monotonic() + 15
        while not _lock_is_free(lock) and time.monotonic() < deadline:
            time.sleep(0.25)
        assert _lock_is_free(lock)
        # the next build stops that server and removes its folder before it starts its own
        second = subprocess.run(["bash", script], env=dict(env, LS_TEMPLATE_TIMEOUT="2"), capture_output=True,
                                text=True, timeout=120)
        assert second.returncode != 0 and "did not answer" in second.stderr, second.stderr
        assert "a killed build left running" in second.stdout, second.stdout
        for _ in range(40):
            if not _alive(server):
                break
            time.sleep(0.25)
        assert not _alive(server)
        assert not list(cache.glob("label-studio-template.build.*"))
    finally:
        try:
            os.killpg(server, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
