"""Run a real Label Studio for end-to-end tests and talk to its API.

Label Studio lives in its own virtualenv (its pins need not agree with ours) and a migrated
template data folder, both made by ``scripts/ensure-label-studio.sh`` under
``$LS_BACKEND_CACHE`` (default ``~/.cache/ls-backend``). Each :class:`LabelStudio` copies the
template into a fresh temporary folder, so a start takes seconds instead of the minute that
the database migrations take, and every run begins with an empty instance.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable, Optional

import requests

LABEL_STUDIO_VERSION = "1.23.2"
TEMPLATE_MARKER = ".ls-backend-template-complete"
REPO_ROOT = Path(__file__).resolve().parents[2]
ENSURE_SCRIPT = REPO_ROOT / "scripts" / "ensure-label-studio.sh"

# Environment variables Label Studio reads under their bare names (``get_env`` tries
# LABEL_STUDIO_<name>, HEARTEX_<name> and <name>); a developer's HOST or USERNAME must not leak in.
_BARE_NAMES_TO_DROP = ("HOST", "PORT", "USERNAME", "PASSWORD", "USER_TOKEN", "PYTHONPATH", "PYTHONHOME")
_PREFIXES_TO_DROP = ("LABEL_STUDIO_", "HEARTEX_", "DJANGO_")


class LabelStudioError(RuntimeError):
    """Label Studio could not be prepared, started, or answered an API call badly."""


def cache_dir() -> Path:
    return Path(os.environ.get("LS_BACKEND_CACHE") or Path.home() / ".cache" / "ls-backend")


def venv_dir() -> Path:
    return cache_dir() / "label-studio-venv"


def template_dir() -> Path:
    return cache_dir() / "label-studio-template"


def executable() -> Path:
    return venv_dir() / "bin" / "label-studio"


def read_template_marker(template: Optional[Path] = None) -> Optional[dict]:
    """The ``key=value`` lines of the template's completion marker, or None if it is not complete."""
    marker = (template or template_dir()) / TEMPLATE_MARKER
    if not marker.is_file():
        return None
    values = {}
    for line in marker.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip()
    if not {"email", "password", "token"} <= values.keys() or values.get("version") != LABEL_STUDIO_VERSION:
        return None
    return values


def is_installed() -> bool:
    """True when the virtualenv and a complete template are both present."""
    return executable().is_file() and read_template_marker() is not None


def ensure_installed(timeout: float = 1800) -> None:
    """Run ``scripts/ensure-label-studio.sh``; raise LabelStudioError with its output on failure."""
    try:
        proc = subprocess.run(
            ["bash", str(ENSURE_SCRIPT)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabelStudioError(f"{ENSURE_SCRIPT} could not run: {exc}") from exc
    if proc.returncode != 0 or not is_installed():
        tail = "\n".join(proc.stdout.splitlines()[-30:])
        raise LabelStudioError(f"{ENSURE_SCRIPT} failed (exit {proc.returncode}):\n{tail}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LabelStudioClient:
    """A small client for the parts of the Label Studio REST API the tests use."""

    def __init__(self, url: str, token: str, timeout: float = 120):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Token {token}"

    def request(self, method: str, path: str, expect: Iterable[int] = (200, 201, 204), **kwargs) -> Any:
        """Call ``path`` (relative to the server) and return the decoded JSON (None when empty)."""
        kwargs.setdefault("timeout", self.timeout)
        response = self.session.request(method, self.url + path, **kwargs)
        if response.status_code not in tuple(expect):
            raise LabelStudioError(
                f"{method} {path} answered {response.status_code}: {response.text[:2000]}" + self._error_context()
            )
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            return response.text

    def _error_context(self) -> str:
        return ""

    # projects and tasks
    def create_project(self, title: str, label_config: str, **fields) -> dict:
        return self.request("POST", "/api/projects", json={"title": title, "label_config": label_config, **fields})

    def project(self, project_id: int) -> dict:
        return self.request("GET", f"/api/projects/{project_id}")

    def import_tasks(self, project_id: int, data: list[dict]) -> list[int]:
        """Import one task per dict of data fields; return the new task ids in order."""
        answer = self.request(
            "POST",
            f"/api/projects/{project_id}/import",
            params={"return_task_ids": "true"},
            json=[{"data": item} for item in data],
        )
        task_ids = answer.get("task_ids") if isinstance(answer, dict) else None
        if task_ids is None or len(task_ids) != len(data):
            raise LabelStudioError(f"import into project {project_id} gave no usable task ids: {answer}")
        return task_ids

    def tasks(self, project_id: int) -> list[dict]:
        """Every task of the project, predictions and annotations included."""
        tasks: list[dict] = []
        page = 1
        while True:
            answer = self.request(
                "GET",
                "/api/tasks",
                params={"project": project_id, "page": page, "page_size": 100, "fields": "all"},
                expect=(200, 404),
            )
            batch = answer.get("tasks", []) if isinstance(answer, dict) else []
            tasks.extend(batch)
            if not batch or len(tasks) >= answer.get("total", 0):
                return tasks
            page += 1

    # ML backends
    def connect_ml_backend(
        self,
        project_id: int,
        url: str,
        title: str = "ls-backend",
        auth_method: Optional[str] = None,
        basic_auth_user: Optional[str] = None,
        basic_auth_pass: Optional[str] = None,
        **fields,
    ) -> int:
        """Add a backend to the project (Label Studio calls its /health and /setup); return its id."""
        body = {"url": url, "project": project_id, "title": title, **fields}
        if basic_auth_user is not None or basic_auth_pass is not None:
            auth_method = auth_method or "BASIC_AUTH"
        if auth_method is not None:
            body["auth_method"] = auth_method
        if basic_auth_user is not None:
            body["basic_auth_user"] = basic_auth_user
        if basic_auth_pass is not None:
            body["basic_auth_pass"] = basic_auth_pass
        return self.request("POST", "/api/ml", json=body)["id"]

    def ml_backend(self, ml_id: int) -> dict:
        return self.request("GET", f"/api/ml/{ml_id}")

    def ml_backends(self, project_id: int) -> list[dict]:
        return self.request("GET", "/api/ml", params={"project": project_id})

    def train(self, ml_id: int) -> None:
        """The "Start Training" button: Label Studio sends START_TRAINING to the backend."""
        self.request("POST", f"/api/ml/{ml_id}/train")

    # predictions
    def retrieve_predictions(self, project_id: int) -> dict:
        """The Data Manager action "Retrieve predictions" over all tasks (one /predict call).

        It answers 200 even when the backend failed: read :meth:`predictions` afterwards.
        """
        return self.request(
            "POST",
            "/api/dm/actions",
            params={"id": "retrieve_tasks_predictions", "project": project_id},
            json={"selectedItems": {"all": True, "excluded": []}},
        )

    def predictions(self, project_id: int) -> list[dict]:
        return self.request("GET", "/api/predictions", params={"project": project_id})

    def versions_by_task(self, project_id: int) -> dict[int, Counter]:
        """How many predictions of each ``model_version`` every task of the project holds."""
        found: dict[int, Counter] = defaultdict(Counter)
        for prediction in self.predictions(project_id):
            found[prediction["task"]][prediction["model_version"]] += 1
        return found

    # annotations
    def create_annotation(self, task_id: int, result: list[dict], **fields) -> dict:
        return self.request("POST", f"/api/tasks/{task_id}/annotations", json={"result": result, **fields})

    def annotate_gold(self, task_ids: Iterable[int], gold: dict[int, str], per_label: int) -> list[int]:
        """Annotate, in task order, up to ``per_label`` tasks of each gold topic with that topic (the
        ``topic`` Choices control); the annotated task ids."""
        from .events import choices

        taken: dict[str, int] = {}
        labeled = []
        for task_id in task_ids:
            if taken.get(gold[task_id], 0) < per_label:
                taken[gold[task_id]] = taken.get(gold[task_id], 0) + 1
                self.create_annotation(task_id, choices(gold[task_id]))
                labeled.append(task_id)
        return labeled

    def update_annotation(self, annotation_id: int, result: list[dict], **fields) -> dict:
        return self.request("PATCH", f"/api/annotations/{annotation_id}", json={"result": result, **fields})

    def delete_annotation(self, annotation_id: int) -> None:
        self.request("DELETE", f"/api/annotations/{annotation_id}")

    # webhooks
    def webhooks(self, project_id: int) -> list[dict]:
        return self.request("GET", "/api/webhooks", params={"project": project_id})


class LabelStudio(LabelStudioClient):
    """A Label Studio server of our own on 127.0.0.1, started from a copy of the template.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. The API methods of
    :class:`LabelStudioClient` are available once started.
    """

    def __init__(self, start_timeout: float = 180, keep_data: bool = False, extra_env: Optional[dict] = None):
        self.start_timeout = start_timeout
        self.extra_env = dict(extra_env or {})  # Label Studio settings of this server (e.g. TASK_API_PAGE_SIZE_MAX)
        self.keep_data = keep_data or os.environ.get("LS_E2E_KEEP") == "1"
        self.process: Optional[subprocess.Popen] = None
        self.workdir: Optional[Path] = None
        self.data_dir: Optional[Path] = None
        self.log_path: Optional[Path] = None
        self.port: Optional[int] = None
        self.startup_seconds: Optional[float] = None
        self.credentials: dict = {}
        self._log_file = None

    # lifecycle
    def start(self) -> "LabelStudio":
        if not executable().is_file():
            raise LabelStudioError(f"Label Studio is not installed at {venv_dir()}: run {ENSURE_SCRIPT}")
        marker = read_template_marker()
        if marker is None:
            raise LabelStudioError(f"no complete Label Studio template at {template_dir()}: run {ENSURE_SCRIPT}")
        self.credentials = marker
        began = time.monotonic()
        self.workdir = Path(tempfile.mkdtemp(prefix="ls-e2e-"))
        self.data_dir = self.workdir / "data"
        # cp -a semantics: keep modes, times and links
        shutil.copytree(template_dir(), self.data_dir, symlinks=True, copy_function=shutil.copy2)
        (self.data_dir / TEMPLATE_MARKER).unlink(missing_ok=True)

        last_problem = ""
        for attempt in range(1, 6):
            self.log_path = self.workdir / f"label-studio-{attempt}.log"
            port = free_port()
            problem, retryable = self._launch_and_wait(port)
            if problem is None:
                self.port = port
                super().__init__(f"http://127.0.0.1:{port}", marker["token"])
                self.startup_seconds = time.monotonic() - began
                return self
            last_problem = problem
            self._terminate()
            if not retryable:
                break
        raise LabelStudioError(f"Label Studio did not start: {last_problem} (log: {self.log_path})")

    def _environment(self) -> dict:
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in _BARE_NAMES_TO_DROP and not key.startswith(_PREFIXES_TO_DROP)
        }
        env.update(
            LABEL_STUDIO_BASE_DATA_DIR=str(self.data_dir),
            LABEL_STUDIO_USERNAME=self.credentials["email"],
            LABEL_STUDIO_PASSWORD=self.credentials["password"],
            LABEL_STUDIO_USER_TOKEN=self.credentials["token"],
            LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true",
            LABEL_STUDIO_ML_BLOCK_LOCAL_IP="false",
            LABEL_STUDIO_SSRF_PROTECTION_ENABLED="false",
            LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK="true",
            LABEL_STUDIO_LATEST_VERSION_CHECK="false",
            PYTHONUNBUFFERED="1",
        )
        env.update(self.extra_env)
        return env

    def _launch_and_wait(self, port: int) -> tuple[Optional[str], bool]:
        """Start on ``port``: (None, _) once it answers there, else (why not, whether another port may help)."""
        self._log_file = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [
                str(executable()),
                "start",
                "--no-browser",
                "--internal-host",
                "127.0.0.1",
                "-p",
                str(port),
            ],
            cwd=self.workdir,
            env=self._environment(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        started_line = f"Starting development server at http://127.0.0.1:{port}/"
        probe = uuid.uuid4().hex
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            log = self.log_text()
            if self.process.poll() is not None:
                if "already in use" in log:
                    return f"port {port} was taken", True
                return f"the process exited with code {self.process.returncode}", False
            if "Starting development server at" in log and started_line not in log:
                # Label Studio silently moves to the next port when ours looked busy
                return f"it moved off port {port}", True
            if started_line in log:
                try:
                    answer = requests.get(f"http://127.0.0.1:{port}/health", params={"probe": probe}, timeout=5)
                except requests.RequestException:
                    answer = None
                # The probe in our own log proves that it was our process that answered.
                if answer is not None and answer.ok and probe in self.log_text():
                    return None, False
            time.sleep(0.25)
        return f"no answer on port {port} within {self.start_timeout:.0f} s", False

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _error_context(self) -> str:
        return f"\n(Label Studio log: {self.log_path})"

    def _terminate(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    process.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def stop(self) -> None:
        """Stop the server (its whole process group) and drop its data; the log files stay."""
        self._terminate()
        if self.data_dir is not None and not self.keep_data:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> "LabelStudio":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"LabelStudio(url={getattr(self, 'url', None)!r}, log={self.log_path})"
