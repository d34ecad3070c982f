"""Start the backend the way the README does (the ``ls-backend`` console script), on a free port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import requests

from ls_backend.settings import Settings

REPO = Path(__file__).resolve().parents[2]

#: the backend's own settings: each field of ls_backend/settings.py is read from its name in capitals
#: (``model_dir`` from MODEL_DIR, ``redis_url`` from REDIS_URL, ``basic_auth_user`` from BASIC_AUTH_USER, ...)
SETTINGS_VARIABLES = frozenset(field.name.upper() for field in fields(Settings))


def under_pytest() -> bool:
    return "PYTEST_CURRENT_TEST" in os.environ


def server_environment(env: dict[str, str] | None = None, inherit_settings: bool = False) -> dict[str, str]:
    """This process's environment (PATH, HOME, proxies, ...) with ``env`` on top. Unless
    ``inherit_settings``, the backend's settings are left out of what is inherited, so that a deploy
    host's DATABASE_URL, REDIS_URL, BASIC_AUTH_*, LABEL_STUDIO_* ... never reach a test's backend:
    a setting a test needs goes in ``env``."""
    inherited = dict(os.environ)
    if not inherit_settings:
        inherited = {name: value for name, value in inherited.items() if name not in SETTINGS_VARIABLES}
    return {**inherited, **(env or {})}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def console_script() -> list[str]:
    script = Path(sys.executable).parent / "ls-backend"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "ls_backend.cli"]


class BackendServer:
    """``ls-backend serve`` in a child process with its own MODEL_DIR.

    Its settings are ``env`` and nothing else (see :func:`server_environment`) when it runs under pytest;
    the benchmarks under bench/, run as scripts, keep the caller's (``INFERENCE_PRECISION=float32 python3
    bench/predict.py``). ``inherit_settings`` says so explicitly either way."""

    def __init__(
        self,
        model_dir: Path,
        env: dict[str, str] | None = None,
        port: int | None = None,
        args: list[str] | None = None,
        inherit_settings: bool | None = None,
    ):
        self.model_dir = Path(model_dir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        own = {"MODEL_DIR": str(self.model_dir), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        if inherit_settings is None:
            inherit_settings = not under_pytest()
        self.env = server_environment({**own, **(env or {})}, inherit_settings)
        self.args = args or []
        self.log_path = self.model_dir.parent / f"backend-{self.port}.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> "BackendServer":
        self.model_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            console_script() + ["serve", "--host", "127.0.0.1", "--port", str(self.port), *self.args],
            env=self.env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"backend exited with {self.process.returncode}; log:\n{self.log()}")
            try:
                if requests.get(self.url + "/health", timeout=1, auth=self.auth).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"backend did not answer within {timeout}s; log:\n{self.log()}")

    @property
    def auth(self):
        user, password = self.env.get("BASIC_AUTH_USER"), self.env.get("BASIC_AUTH_PASS")
        return (user, password) if user and password else None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> "BackendServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
