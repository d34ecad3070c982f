"""The Flask app: Label Studio's ML-backend protocol, operator routes, auth, errors as JSON."""

from __future__ import annotations

import base64
import binascii
import errno
import hmac
import logging
import threading
import time
from typing import Any, Callable

from flask import Blueprint, Flask, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.http import HTTP_STATUS_CODES

from . import __version__
from .curve import learning_curve, learning_curve_png
from .jobs import TrainingQueue, queue_from_settings
from .predictor import Predictor
from .registry import ModelRegistry, RegistryError, is_version_name, safe_key
from .settings import Settings
from .store import BadEvent, CorrectionStore, EventOutcome, UnknownProject
from .sync import SyncScheduler

log = logging.getLogger(__name__)

protocol = Blueprint("protocol", __name__)
operator = Blueprint("operator", __name__)

WEBHOOK_AUTH_HELP = (
    "this backend requires HTTP basic auth, and Label Studio sends its automatic webhook without it; "
    "add the header once in Label Studio: PATCH /api/webhooks/<id> with "
    '{"headers": {"Authorization": "Basic <base64 of user:password>"}} (see the README, "Basic auth")'
)


class BadRequest(Exception):
    """A request we understood to be wrong: answered 400 with a message saying what to fix."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status


def services() -> "Services":
    return current_app.extensions["ls_backend"]


class Services:
    """What the routes use, built once per process."""

    def __init__(self, settings: Settings, predictor: Predictor | None = None):
        self.settings = settings
        self.registry = ModelRegistry(settings.model_dir)
        self._predictor = predictor
        self._store: CorrectionStore | None = None
        self._store_lock = threading.Lock()
        self.sync = SyncScheduler(settings, lambda: self.store, on_synced=lambda outcome: self.maybe_train(outcome))
        # called with each EventOutcome after its event is stored; errors are logged, never returned
        self.event_listeners: list[Callable[[EventOutcome], None]] = [self.sync.on_event, self.maybe_train]
        self._queue: TrainingQueue | None = None

    @property
    def queue(self) -> TrainingQueue:
        """The training queue (rq with REDIS_URL, else the embedded job table)."""
        if self._queue is None:
            with self._store_lock:
                if self._queue is None:
                    self._queue = queue_from_settings(self.settings)
        return self._queue

    def maybe_train(self, outcome: EventOutcome) -> None:
        job = self.queue.maybe_enqueue(self.store, outcome)
        if job is not None:
            log.info("project %s: %s -> training job %s (%s)", outcome.project_key, outcome.action, job.id, job.state)

    @property
    def store(self) -> CorrectionStore:
        """The corrections store, opened (and migrated) on first use in this process."""
        if self._store is None:
            with self._store_lock:
                if self._store is None:
                    self._store = CorrectionStore.from_settings(self.settings)
                    log.info("corrections store: %s", self._store.describe())
        return self._store

    def note_setup(self, project: str, payload: dict, schema: str) -> None:
        """Remember how to reach Label Studio for this project; check in the background if the store is behind."""
        hostname, token = payload.get("hostname"), payload.get("access_token")
        try:
            self.store.note_setup(
                project,
                schema,
                hostname if isinstance(hostname, str) else None,
                token if isinstance(token, str) else None,
            )
            self.sync.on_setup(project)
        except Exception:  # /setup must answer even when the store cannot be written
            log.exception("setup of project %s: could not be recorded in the store", project)

    def notify(self, outcome: EventOutcome) -> list[tuple[Callable, Exception]]:
        """Tell the listeners (the sync, the training queue) of a stored event; returns their failures."""
        failures = []
        for listener in list(self.event_listeners):
            try:
                listener(outcome)
            except Exception as exc:
                failures.append((listener, exc))
                log.exception("event listener %r failed on %s for project %s", listener, outcome.action,
                              outcome.project_key)
        return failures

    @property
    def predictor(self) -> Predictor:
        if self._predictor is None:
            self._predictor = Predictor(self.settings, self.registry)
        return self._predictor


def has_body() -> bool:
    """Whether the request carries a body, whatever its Content-Type (``request.data`` is empty for
    a form type, whose body Werkzeug parses as a form: curl's ``-d`` sends JSON as one)."""
    return bool(request.get_data(cache=True))


def json_body() -> dict:
    if not has_body():
        raise BadRequest("empty body: send a JSON object")
    try:
        payload = request.get_json(silent=True, force=True)
    except RecursionError:  # silent=True covers ValueError only
        raise BadRequest("the body's JSON is nested too deeply") from None
    if payload is None:
        encoding = (request.headers.get("Content-Encoding") or "").strip().lower()
        if encoding not in ("", "identity"):
            raise BadRequest(f"the body is sent with Content-Encoding {encoding[:40]!r}, which is not read here: "
                             "send it uncompressed")
        if request.get_data(cache=True).strip() == b"null":
            raise BadRequest("the body must be a JSON object, not null")
        raise BadRequest("the body is not valid JSON")
    if not isinstance(payload, dict):
        raise BadRequest(f"the body must be a JSON object, not {type(payload).__name__}")
    return payload


def require_str(payload: dict, *names: str) -> str:
    for name in names:
        value = payload.get(name)
        if value is None:
            continue
        if isinstance(value, float):  # 3.1732665260 would come back as "3.173266526": another key
            raise BadRequest(f"'{name}' must be a string (a number with a fraction loses digits: send it as text, "
                             "like \"3.1732665262\")")
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value.strip():
            raise BadRequest(f"'{name}' must be a non-empty string")
        return value
    raise BadRequest(f"missing field '{names[0]}'" + (f" (or '{names[1]}')" if len(names) > 1 else ""))


def project_key_of(value: str, name: str = "project") -> str:
    """A project key Label Studio could have sent ("<id>.<created timestamp>", or a name that is
    its own model folder's name); 400 otherwise."""
    # (120 characters of letters, digits, '.', '_', '-': what a model folder's name keeps of a key,
    # so two keys never share one folder)
    if not value.isprintable() or len(value) > 120:
        raise BadRequest(f"'{name}' must be printable text of at most 120 characters, like \"3.1732665262\"")
    head = value.split(".", 1)[0]
    if head.isdecimal() and int(head) > 2**63 - 1:
        raise BadRequest(f"'{name}': project id {head[:30]} is out of range (at most 2**63 - 1)")
    try:
        folder = safe_key(value)
    except RegistryError as exc:
        raise BadRequest(f"'{name}': {exc}") from None
    if folder != value:
        raise BadRequest(f"'{name}' {value[:40]!r}: letters, digits, '.', '_' and '-' only (not starting with '.'), "
                         "like \"3.1732665262\"")
    return value


def label_config_of(payload: dict) -> str:
    params = payload.get("params") if isinstance(payload.get("params"), dict) else {}
    for source in (payload, params):
        for name in ("label_config", "schema"):
            if source.get(name) is not None:
                if not isinstance(source[name], str):
                    raise BadRequest(f"'{name}' must be a string holding the label config XML")
                if not source[name].strip():
                    raise BadRequest(f"'{name}' is empty: send the project's label config XML")
                return source[name]
    raise BadRequest("missing field 'label_config' (or 'schema', as /setup names it): the project's label config XML")


# -- protocol routes -----------------------------------------------------------------
@protocol.get("/")
@protocol.get("/health")
def health():
    # the device and precision this web worker serves with (operators and bench/predict.py read them)
    predictor = services().predictor
    return jsonify({
        "status": "UP", "model_class": "ls-backend", "version": __version__,
        "device": predictor.device.type, "precision": predictor.base_encoder.precision_tag,
    })


@protocol.post("/setup")
def setup():
    payload = json_body()
    project = project_key_of(require_str(payload, "project"))
    schema = label_config_of(payload)
    services().note_setup(project, payload, schema)
    version = services().predictor.setup(project, schema)
    return jsonify({"model_version": version})


@protocol.post("/predict")
def predict():
    received = time.perf_counter()
    payload = json_body()
    tasks = payload.get("tasks")
    if tasks is None:
        raise BadRequest("missing field 'tasks' (a list of Label Studio task objects)")
    if not isinstance(tasks, list):
        raise BadRequest("'tasks' must be a list of task objects")
    limit = services().settings.max_tasks_per_request
    if len(tasks) > limit:
        raise BadRequest(f"{len(tasks)} tasks in one request; at most {limit} (MAX_TASKS_PER_REQUEST)", 413)
    project = project_key_of(require_str(payload, "project"))
    config = label_config_of(payload)
    started = time.perf_counter()
    budget = services().settings.predict_time_budget  # counted from the request's arrival
    results = services().predictor.predict(project, config, tasks, received + budget if budget > 0 else None)
    response = jsonify({"results": results})
    # what the request cost inside this worker (browsers' dev tools and bench/predict.py show it
    # beside the round trip, so time on the wire and in the server can be told apart)
    response.headers["Server-Timing"] = f"predict;dur={(time.perf_counter() - started) * 1000:.2f}"
    return response


@protocol.post("/webhook")
def webhook():
    payload = json_body()
    action = payload.get("action")
    if not isinstance(action, str) or not action.strip():
        raise BadRequest("missing field 'action' (a Label Studio webhook event name)")
    svc = services()
    try:
        outcome = svc.store.record_event(payload)  # durable before we answer
    except BadEvent as exc:
        raise BadRequest(f"{action}: {exc.message}") from None
    unqueued = [exc for listener, exc in svc.notify(outcome) if listener == svc.maybe_train]
    if unqueued and outcome.trigger:
        # a label that could not queue its job is caught up by the next one; a press of Start
        # Training is not, so Label Studio must show that it failed
        raise BadRequest(
            f"Start Training could not be queued ({type(unqueued[0]).__name__}: {unqueued[0]}); the request is "
            "stored: press Start Training again once the job queue (Redis) answers", 503
        )
    body = {"status": "ok", "action": action, "project": outcome.project_key, "changed": outcome.changed}
    if outcome.rejected:
        # the well-formed entries are stored (and count towards training); the answer still says
        # which entries were not, and why
        message = (f"{action}: {len(outcome.rejected)} malformed entries were not stored (the others were): "
                   + "; ".join(outcome.rejected[:20]) + ("; ..." if len(outcome.rejected) > 20 else ""))
        log.info("POST /webhook -> 400: %s", message)
        body.update({"status": "partial", "error": "bad_request", "message": message,
                     "rejected": list(outcome.rejected[:1000]), "rejected_count": len(outcome.rejected)})
        return jsonify(body), 400
    return jsonify(body)


@protocol.get("/versions")
def versions():
    registry = services().registry
    project = request.args.get("project")
    keys = [project_key_of(project)] if project else registry.projects()
    names = [v.name for key in keys for v in registry.versions(key)]
    return jsonify({"versions": names})


# -- operator routes -----------------------------------------------------------------
@operator.get("/projects")
def list_projects():
    store = services().store
    return jsonify({"store": store.describe(), "projects": [p.to_dict() for p in store.projects()]})


@operator.get("/projects/<key>")
def project_detail(key: str):
    store = services().store
    try:
        summary = store.project_summary(store.resolve_project(key))
    except UnknownProject as exc:
        raise BadRequest(exc.message, 400 if exc.ambiguous else 404) from None
    return jsonify(summary.to_dict())


def _whole_number(value: str | None, low: int, high: int) -> int | None:
    """``value`` as an integer in [low, high], or None: ASCII digits only, and no longer than
    ``high`` is (Python refuses to read integers of over 4,300 digits)."""
    if value is None or not (value.isascii() and value.isdigit()):
        return None
    digits = value.lstrip("0") or "0"
    if len(digits) > len(str(high)) or not low <= int(digits) <= high:
        return None
    return int(digits)


def _project_key(key: str) -> str:
    """A stored project key, or a bare Label Studio id; 404 when unknown."""
    from .commands import resolve_key

    try:
        return resolve_key(services().store, services().registry, key)
    except UnknownProject as exc:
        raise BadRequest(exc.message, 400 if exc.ambiguous else 404) from None


@operator.get("/projects/<key>/versions")
def project_versions(key: str):
    from .commands import versions_answer

    project = _project_key(key)
    return jsonify(versions_answer(services().settings, services().registry, project))


@operator.post("/projects/<key>/train")
def project_train(key: str):
    from .jobs import FULL, LANES

    project = _project_key(key)
    payload = json_body() if has_body() else {}
    _known_fields(payload, ("lane",))
    lane = payload.get("lane", FULL)
    if lane not in LANES:
        raise BadRequest(f"'lane' must be one of {', '.join(repr(name) for name in LANES)}")
    job, created = services().queue.enqueue(project, "api", lane)
    return jsonify({"queued": created, "job": job.to_dict()}), 202 if created else 200


def _queue_unreachable(exc: Exception) -> bool:
    """A connection error or timeout of the job queue's Redis (with REDIS_URL set)."""
    if not services().settings.redis_url:
        return False
    from .jobs import redis_unreachable

    return isinstance(exc, redis_unreachable())


def _store_unreachable(exc: Exception) -> bool:
    """A database the corrections store cannot reach or read now (SQLAlchemy's OperationalError:
    the server down or restarting, a connection dropped, SQLite's file locked)."""
    import sqlalchemy as sa

    return isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError))


def _unless_a_server_fault(exc: Exception) -> None:
    """Re-raise an ``OSError`` that is the server's (a full disk, a lost share): a 500, not a 404;
    errors of the name asked for (too long, invalid, no such version) are the client's."""
    if isinstance(exc, OSError) and exc.errno not in (errno.ENAMETOOLONG, errno.EINVAL, errno.ENOENT, errno.ENOTDIR):
        raise exc


def _version_name(name: str, field: str) -> None:
    """400 for a name no version can have (a slash, a NUL, not like p3-v2): the request's fault;
    a well-formed name that names no version is a 404 where it is looked up."""
    if not is_version_name(name):
        raise BadRequest(f"'{field}': bad version name {name[:80]!r}: expected a name such as p3-v2")


def _known_fields(payload: dict, allowed: tuple[str, ...]) -> None:
    """400 for a field the route does not read: a mistyped one would otherwise be dropped, and the
    route would do something else than asked (``{"version": ...}`` on rollback rolled back one step)."""
    unknown = sorted(set(payload) - set(allowed))
    if unknown:
        expected = ", ".join(f"'{name}'" for name in allowed) or "no field (an empty body or {})"
        raise BadRequest(f"unknown field(s) {', '.join(repr(n)[:80] for n in unknown[:5])}: this route reads {expected}")


def _refresh_after_switch(project: str, before: str | None, body: dict) -> dict:
    from .commands import refresh_after_switch

    svc = services()
    return refresh_after_switch(svc.settings, svc.registry, project, before, body, svc.queue)


@operator.post("/projects/<key>/rollback")
def project_rollback(key: str):
    project = _project_key(key)
    payload = json_body() if has_body() else {}
    _known_fields(payload, ("to", "pin"))
    target = payload.get("to")
    if target is not None and not isinstance(target, str):
        raise BadRequest("'to' must be a version name such as p3-v2")
    if target:  # (empty: one step back, as no name)
        _version_name(target, "to")
    pin = payload.get("pin", False)
    if not isinstance(pin, bool):
        raise BadRequest("'pin' must be true or false")
    registry = services().registry
    before = registry.served_version(project)
    try:
        version = registry.rollback(project, target, pin=pin)
    except (RegistryError, OSError, ValueError) as exc:  # (a version's meta.json unreadable: ValueError)
        _unless_a_server_fault(exc)
        raise BadRequest(str(exc), 409 if not target else 404) from None
    return jsonify(_refresh_after_switch(project, before, {"project": project, "current": version,
                                                           "pinned": registry.pinned(project)}))


@operator.route("/projects/<key>/pin", methods=["POST", "DELETE"])
def project_pin(key: str):
    project = _project_key(key)
    registry = services().registry
    before = registry.served_version(project)
    if request.method == "DELETE":
        registry.unpin(project)
    else:
        payload = json_body() if has_body() else {}
        _known_fields(payload, ("version",))
        version = payload.get("version")
        if version is not None and not isinstance(version, str):
            raise BadRequest("'version' must be a version name such as p3-v2")
        if version:  # (empty: the current version, as no name)
            _version_name(version, "version")
        try:
            registry.pin(project, version)
        except (RegistryError, OSError, ValueError) as exc:
            _unless_a_server_fault(exc)
            raise BadRequest(str(exc), 404) from None
    return jsonify(_refresh_after_switch(project, before, {"project": project, "current": registry.current(project),
                                                           "pinned": registry.pinned(project)}))


@operator.get("/projects/<key>/learning-curve")
def project_learning_curve(key: str):
    return jsonify(learning_curve(services().registry, _project_key(key)))


@operator.get("/projects/<key>/learning-curve.png")
def project_learning_curve_png(key: str):
    png = learning_curve_png(learning_curve(services().registry, _project_key(key)))
    return current_app.response_class(png, mimetype="image/png")


@operator.get("/projects/<key>/next")
def project_next(key: str):
    """The next batch of unlabeled task ids to label, ranked from the last refresh's pool (files only)."""
    from .jobs import REFRESH_TRIGGER
    from .sampling import STRATEGIES, NoPool, next_batch

    project = _project_key(key)
    n = _whole_number(request.args.get("n", "20"), 1, 1000)
    if n is None:
        raise BadRequest("'n' must be an integer from 1 to 1000")
    seed = request.args.get("seed")
    if seed is not None:
        seed = _whole_number(seed, 0, 2**63 - 1)
        if seed is None:
            raise BadRequest("'seed' must be an integer from 0 to 2**63 - 1")
    strategy = request.args.get("strategy") or None
    if strategy is not None and strategy not in STRATEGIES:
        raise BadRequest(f"'strategy' must be one of {', '.join(STRATEGIES)}")
    svc = services()
    refreshing = svc.settings.refresh_max_tasks > 0
    try:
        batch = next_batch(svc.settings, svc.registry, svc.store, project, n, strategy, seed)
    except NoPool as exc:
        if not refreshing:
            raise BadRequest(f"{exc}, and REFRESH_MAX_TASKS=0 turns refreshes off", 409) from None
        job, _ = svc.queue.enqueue(project, REFRESH_TRIGGER)
        return jsonify({"project": project, "status": "preparing", "job": job.to_dict(),
                        "message": f"{exc}; a refresh job lists and predicts them now: ask again when it has finished"}), 202
    body = batch.to_dict()
    # an older version's pool (a rollback), a refresh not finished, every task of the pool labeled
    # or skipped, or fewer left than asked for where the refresh stopped at REFRESH_MAX_TASKS: a
    # refresh (a top-up for the same version) lists what is left
    if refreshing and (batch.stale or not batch.task_ids or (len(batch.task_ids) < n and batch.pool_bounded)):
        body["refresh_job"] = svc.queue.enqueue(project, REFRESH_TRIGGER)[0].id
    return jsonify(body)


@operator.get("/jobs")
def list_jobs():
    project = request.args.get("project")
    limit = _whole_number(request.args.get("limit", "50"), 1, 10_000)
    if limit is None:
        raise BadRequest("'limit' must be an integer from 1 to 10000")
    jobs = services().queue.jobs(_project_key(project) if project else None, limit)
    return jsonify({"jobs": [job.to_dict() for job in jobs]})


@operator.get("/jobs/<job_id>")
def job_detail(job_id: str):
    job = services().queue.get(job_id)
    if job is None:
        raise BadRequest(f"no job {job_id}", 404)
    return jsonify(job.to_dict())


# -- auth and errors -----------------------------------------------------------------
def _credentials_ok(settings: Settings) -> bool:
    header = request.headers.get("Authorization", "")
    if not header.lower().startswith("basic "):
        return False
    try:
        decoded = base64.b64decode(header[6:].strip().encode("ascii"), validate=False)
    except (binascii.Error, ValueError):  # ValueError: a header with non-ASCII characters
        return False
    user, _, password = decoded.partition(b":")
    # compared as bytes (compare_digest refuses str with non-ASCII characters), in either encoding a
    # client may send: UTF-8 (curl, browsers) or Latin-1 (requests' HTTPBasicAuth, which Label Studio
    # uses for its calls to an ML backend)
    ok = False
    for encoding in ("utf-8", "latin-1"):
        try:
            expected_user = settings.basic_auth_user.encode(encoding)
            expected_pass = settings.basic_auth_pass.encode(encoding)
        except UnicodeEncodeError:
            continue
        ok |= hmac.compare_digest(user, expected_user) & hmac.compare_digest(password, expected_pass)
    return ok


def _error_name(status: int) -> str:
    """The ``error`` field for a status: "bad_request", "not_found", "conflict", ..."""
    return HTTP_STATUS_CODES.get(status, "bad request").lower().replace(" ", "_")


def _error(status: int, error: str, message: str, **extra: Any):
    body = {"error": error, "message": message, **extra}
    response = jsonify(body)
    response.status_code = status
    return response


def create_app(settings: Settings | None = None, predictor: Predictor | None = None, preload: bool = True) -> Flask:
    settings = settings or Settings.from_env()
    app = Flask("ls_backend")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_mb * 1024 * 1024
    app.json.sort_keys = False
    app.extensions["ls_backend"] = Services(settings, predictor)
    app.register_blueprint(protocol)
    app.register_blueprint(operator)

    if preload:
        services_ = app.extensions["ls_backend"]
        services_.predictor  # load the encoder now, never inside a request

    @app.before_request
    def authenticate():
        g.started = time.perf_counter()
        if not settings.auth_enabled or _credentials_ok(settings):
            return None
        if request.endpoint == "protocol.webhook":
            log.warning("unauthenticated webhook refused: %s", WEBHOOK_AUTH_HELP)
            return _error(401, "unauthorized", WEBHOOK_AUTH_HELP)
        response = _error(401, "unauthorized", "HTTP basic auth required (BASIC_AUTH_USER / BASIC_AUTH_PASS)")
        response.headers["WWW-Authenticate"] = 'Basic realm="ls-backend"'
        return response

    @app.errorhandler(BadRequest)
    def bad_request(exc: BadRequest):
        log.info("%s %s -> %d: %s", request.method, request.path, exc.status, exc.message)
        return _error(exc.status, _error_name(exc.status), exc.message)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        message = exc.description or exc.name
        if exc.code == 413:
            message = f"request body too large: at most {settings.max_request_mb} MiB (MAX_REQUEST_MB)"
            if request.path.rstrip("/").endswith("/predict"):
                message += "; send fewer tasks per request"
        return _error(exc.code or 500, exc.name.lower().replace(" ", "_"), message)

    @app.errorhandler(Exception)
    def internal_error(exc: Exception):
        if _queue_unreachable(exc):  # the job queue's Redis, down or restarting: try again later
            log.warning("%s %s -> 503: %s", request.method, request.path, exc)
            return _error(503, "queue_unavailable", f"the job queue (Redis, REDIS_URL) does not answer "
                          f"({type(exc).__name__}: {exc}); try again once it answers")
        if _store_unreachable(exc):  # the corrections store's database, down, restarting or locked
            log.warning("%s %s -> 503: %s", request.method, request.path, exc)
            return _error(503, "store_unavailable", f"the corrections store (DATABASE_URL) cannot be read "
                          f"({type(exc).__name__}: {str(exc)[:300]}); try again once it answers")
        log.exception("%s %s failed", request.method, request.path)
        return _error(500, "internal_error", f"{type(exc).__name__}: {exc}; see the backend log for the traceback")

    return app
