"""docker/docker-compose.yml is a valid Compose file and wires what the README promises; the worker image
keeps its own promises.

No Docker engine is needed.  The compose file is validated against the Compose Specification's JSON
schema as Docker Compose v2.40.3 embeds it (vendored in tests/data/compose-spec.json; its source and how to
re-create it: tests/data/compose-spec.SOURCE.md), both as written and after ``${...}`` interpolation with
the settings of docker/.env.example.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft7Validator

from tests.test_docker import instructions

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker" / "docker-compose.yml"
ENV_EXAMPLE = REPO / "docker" / ".env.example"
SCHEMA = REPO / "tests" / "data" / "compose-spec.json"
SCHEMA_SOURCE = REPO / "tests" / "data" / "compose-spec.SOURCE.md"


# -- reading the files -------------------------------------------------------------------
def load_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # safe_load resolves the `<<` merge keys, as Compose does


def validator() -> Draft7Validator:
    schema = json.loads(SCHEMA.read_text())
    Draft7Validator.check_schema(schema)
    return Draft7Validator(schema)


def schema_errors(document: dict) -> list[str]:
    return [
        f"{'/'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message[:300]}"
        for error in sorted(validator().iter_errors(document), key=lambda e: list(e.absolute_path))
    ]


def env_example(commented: bool = False, **overrides: str) -> dict[str, str]:
    """KEY=VALUE lines of docker/.env.example (also the commented-out ones with ``commented``), with
    ``overrides`` on top: what a user who copied it gets."""
    values = {}
    pattern = r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$" if commented else r"^([A-Z][A-Z0-9_]*)=(.*)$"
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.match(pattern, line.strip())
        if match:
            values[match[1]] = match[2]
    values.update(overrides)
    return values


_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+]))?")


class MissingVariable(ValueError):
    pass


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?error}``, ``${VAR:+alt}`` and
    ``$$`` (nested ones inside a default too) over ``env`` (only what the compose file uses)."""

    def parse(i: int, stop: str | None) -> tuple[str, int]:
        out = []
        while i < len(text):
            c = text[i]
            if stop is not None and c == stop:
                return "".join(out), i
            if text.startswith("$$", i):
                out.append("$")
                i += 2
                continue
            match = _VAR.match(text, i)
            if match:
                name, op = match["name"], match["op"]
                i = match.end()
                arg = ""
                if op:
                    arg, i = parse(i, "}")
                if i >= len(text) or text[i] != "}":
                    raise ValueError(f"unclosed ${{ in {text!r}")
                i += 1
                value = env.get(name)
                if op in (":-", "-"):
                    out.append(value if (value if op == ":-" else value is not None) else arg)
                elif op in (":?", "?"):
                    if value is None or (op == ":?" and value == ""):
                        raise MissingVariable(f"{name}: {arg}")
                    out.append(value)
                elif op in (":+", "+"):
                    out.append(arg if (value if op == ":+" else value is not None) else "")
                else:
                    out.append(value or "")
                continue
            out.append(c)
            i += 1
        return "".join(out), i

    return parse(0, None)[0]


def interpolated(env: dict[str, str]) -> dict:
    def walk(node):
        if isinstance(node, dict):
            return {key: walk(value) for key, value in node.items()}
        if isinstance(node, list):
            return [walk(value) for value in node]
        if isinstance(node, str):
            return interpolate(node, env)
        return node

    return walk(load_compose())


def variables_used() -> set[str]:
    return {m["name"] for m in _VAR.finditer(COMPOSE.read_text())}


# -- the schema --------------------------------------------------------------------------
def test_the_vendored_schema_is_the_one_its_source_note_names():
    note = SCHEMA_SOURCE.read_text()
    recorded = re.search(r"sha256 of compose-spec\.json: `([0-9a-f]{64})`", note)
    assert recorded, "the source note records the schema's sha256"
    assert hashlib.sha256(SCHEMA.read_bytes()).hexdigest() == recorded[1]
    schema = json.loads(SCHEMA.read_text())
    assert schema["title"] == "Compose Specification" and schema["$id"] == "compose_spec.json"


def test_compose_file_is_valid_as_written():
    assert schema_errors(load_compose()) == []


def test_compose_file_is_valid_after_interpolation_with_the_example_settings():
    assert schema_errors(interpolated(env_example(POSTGRES_PASSWORD="s3cret"))) == []
    # and with every optional setting of the example set to its example value
    assert schema_errors(interpolated(env_example(commented=True, POSTGRES_PASSWORD="s3cret"))) == []


def test_the_validator_does_reject_what_compose_rejects():
    """The check has teeth: misspelt keys, a GPU reservation without capabilities, a bad healthcheck."""
    bad = load_compose()
    bad["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"] = [{"driver": "nvidia", "count": 1}]
    bad["services"]["backend"]["healtcheck"] = bad["services"]["backend"].pop("healthcheck")
    bad["services"]["redis"]["healthcheck"]["interval"] = 10
    errors = schema_errors(bad)
    assert any("capabilities" in e for e in errors), errors
    assert any("healtcheck" in e for e in errors), errors
    assert any(e.startswith("services/redis/healthcheck/interval") for e in errors), errors


def test_a_missing_postgres_password_stops_compose_with_the_reason():
    with pytest.raises(MissingVariable, match="POSTGRES_PASSWORD: set POSTGRES_PASSWORD in docker/.env"):
        interpolated({})
    with pytest.raises(MissingVariable):
        interpolated({"POSTGRES_PASSWORD": ""})  # the example's empty value is not a password


# -- the wiring we promise ----------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict:
    return interpolated(env_example(POSTGRES_PASSWORD="s3cret"))


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def mounts(service: dict) -> dict[str, str]:
    """target -> named volume (short syntax ``name:/path``)."""
    found = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        found[target] = source
    return found


def test_services_are_the_ones_the_readme_names(compose):
    assert {"redis", "postgres", "backend", "worker", "worker-fast"} <= set(compose["services"])
    assert set(compose["services"]) <= {"redis", "postgres", "backend", "worker", "worker-fast", "scheduler"}
    assert compose["services"]["scheduler"]["profiles"] == ["scheduler"]  # optional: only with --profile scheduler
    assert "profiles" not in compose["services"]["worker-fast"]  # always there, beside the GPU workers


def test_redis_is_persistent(compose):
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert mounts(redis).get("/data") in compose["volumes"]
    assert "redis-cli" in " ".join(redis["healthcheck"]["test"])


def test_postgres_keeps_its_data_in_a_volume(compose):
    postgres = compose["services"]["postgres"]
    assert mounts(postgres).get("/var/lib/postgresql/data") in compose["volumes"]
    assert environment(postgres)["POSTGRES_PASSWORD"] == "s3cret"
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])


def test_backend_is_the_cpu_image_serving_9090_with_a_health_check_on_health(compose):
    backend = compose["services"]["backend"]
    assert backend["build"]["dockerfile"] == "docker/Dockerfile" and backend["build"]["context"] == ".."
    assert backend["command"][:2] == ["ls-backend", "serve"] and backend["command"][-2:] == ["--port", "9090"]
    assert any(str(port).endswith(":9090") for port in backend["ports"]), backend["ports"]
    test = " ".join(backend["healthcheck"]["test"])
    assert backend["healthcheck"]["test"][0] == "CMD" and "http://127.0.0.1:9090/health" in test
    assert "BASIC_AUTH_USER" in test, "the health check must pass when basic auth is on"
    assert environment(backend)["DEVICE"] == "cpu"


def test_worker_is_the_gpu_image_with_a_gpu_reservation_and_scales(compose):
    worker = compose["services"]["worker"]
    assert worker["build"]["dockerfile"] == "docker/Dockerfile.worker" and worker["build"]["context"] == ".."
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] and d.get("driver") == "nvidia" for d in devices), devices
    # `docker compose up --scale worker=N` needs replicas that do not clash
    assert "container_name" not in worker and "ports" not in worker and "hostname" not in worker
    assert environment(worker)["DEVICE"] == "auto"


def test_fast_lane_worker_runs_on_the_cpu_image_beside_the_gpu_workers(compose):
    """README (two lanes): a GPU worker busy with a full fine-tune takes no fast job, so one worker of the fast
    lane alone keeps head refits flowing; a CPU is enough."""
    fast = compose["services"]["worker-fast"]
    assert fast["build"]["dockerfile"] == "docker/Dockerfile" and fast["build"]["context"] == ".."
    assert fast["image"] == compose["services"]["backend"]["image"]  # the web image, built once
    assert fast["command"] == ["ls-backend", "worker", "--lane", "fast"]
    assert environment(fast)["DEVICE"] == "cpu" and "deploy" not in fast, "no GPU reservation"
    assert "container_name" not in fast and "ports" not in fast and "hostname" not in fast  # --scale worker-fast=N
    # the web image's own check probes :9090/health, which a worker does not serve: healthy while registered in
    # Redis, as the GPU worker image is
    check = fast["healthcheck"]
    test = " ".join(check["test"])
    assert check["test"][0] == "CMD" and "Worker.all" in test and "REDIS_URL" in test and "/health" not in test
    worker_image_check = next(a for k, a in instructions(REPO / "docker" / "Dockerfile.worker") if k == "HEALTHCHECK")
    assert ["CMD", *json.loads(worker_image_check[worker_image_check.index("CMD") + 3 :].strip())] == check["test"]
    assert fast["restart"] == "unless-stopped"


def test_the_embedding_cache_is_each_hosts_own_and_on_a_volume(compose):
    """CACHE_DIR (the embedding cache, one per machine) on a named volume, so a recreated container does not
    encode every text again; kept off the models volume, which several machines may share."""
    for name in ("backend", "worker", "worker-fast"):
        service = compose["services"][name]
        cache_dir = environment(service)["CACHE_DIR"]
        volume = mounts(service).get(cache_dir)
        assert volume in compose["volumes"], f"{name}: CACHE_DIR {cache_dir} is on no named volume"
        assert volume != "models" and cache_dir != environment(service)["MODEL_DIR"], name
    for dockerfile in (REPO / "docker" / "Dockerfile", REPO / "docker" / "Dockerfile.worker"):
        steps = instructions(dockerfile)
        env = " ".join(a for k, a in steps if k == "ENV")
        assert re.search(r"\bCACHE_DIR=/data/cache\b", env), dockerfile.name
        # a new named volume takes the owner of the image's folder: the unprivileged user must be able to write
        assert any(k == "RUN" and re.search(r"chown app:app [^&]*/data/cache", a) for k, a in steps), dockerfile.name


def test_the_scheduler_without_a_schedule_stops_instead_of_restarting_forever(compose):
    """`ls-backend scheduler` exits at once without TRAIN_SCHEDULE; `unless-stopped` would restart it forever.
    And TRAIN_SCHEDULE is no required variable: that would stop `docker compose config`/`up` for everyone,
    the profile's users or not (Compose interpolates every service)."""
    restart = compose["services"]["scheduler"]["restart"]
    match = re.fullmatch(r"on-failure:(\d+)", restart)
    assert match and 1 <= int(match[1]) <= 5, restart
    assert not re.search(r"\$\{TRAIN_SCHEDULE:?\?", COMPOSE.read_text())
    interpolated({"POSTGRES_PASSWORD": "s3cret"})  # no TRAIN_SCHEDULE: still a compose file


def test_backend_and_workers_share_the_registry_volume_the_queue_and_the_store(compose):
    users = {name: compose["services"][name] for name in ("backend", "worker", "worker-fast", "scheduler")}
    model_dirs = set()
    for name, service in users.items():
        env = environment(service)
        model_dir = env["MODEL_DIR"]
        assert mounts(service).get(model_dir) == "models", f"{name}: MODEL_DIR {model_dir} is not the models volume"
        model_dirs.add(model_dir)
        assert env["REDIS_URL"] == "redis://redis:6379/0", name
        assert env["DATABASE_URL"] == "postgresql://lsbackend:s3cret@postgres:5432/lsbackend", name
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy", name
        assert any(entry["path"] == ".env" for entry in service["env_file"]), name
    assert model_dirs == {"/data/models"}
    assert "models" in compose["volumes"]


def test_the_queue_and_the_store_can_be_pointed_elsewhere():
    """Several machines: every service reads REDIS_URL / DATABASE_URL from docker/.env when set there."""
    env = {"POSTGRES_PASSWORD": "x", "REDIS_URL": "redis://:pw@queue:6379/1", "DATABASE_URL": "postgresql://u:p@db:5432/ls"}
    compose = interpolated(env)
    for name in ("backend", "worker", "worker-fast", "scheduler"):
        assert environment(compose["services"][name])["REDIS_URL"] == env["REDIS_URL"]
        assert environment(compose["services"][name])["DATABASE_URL"] == env["DATABASE_URL"]


def test_every_variable_the_compose_file_reads_is_documented_in_the_example():
    documented = set(env_example(commented=True))
    assert variables_used() - documented == set(), "document these in docker/.env.example"


# -- the worker image --------------------------------------------------------------------
def test_worker_image_is_cuda_based_with_cuda_torch_and_runs_the_worker():
    steps = instructions(REPO / "docker" / "Dockerfile.worker")
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for k, a in steps if k == "ARG" and "=" in a}
    first_from = next(a for k, a in steps if k == "FROM")
    base = args.get("CUDA_IMAGE", first_from) if first_from == "${CUDA_IMAGE}" else first_from
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-[a-z]+-ubuntu\d+\.\d+", base), base
    torch_installs = [a for k, a in steps if k == "RUN" and "torch==" in a]
    assert torch_installs and "${TORCH_INDEX_URL}" in torch_installs[0]
    assert "download.pytorch.org/whl/cpu" not in args.get("TORCH_INDEX_URL", "")  # the CUDA build, not the CPU one
    assert any(k == "RUN" and "python3.11" in a for k, a in steps), "Python 3.11, as pyproject.toml requires"
    assert any(k == "RUN" and re.search(r"pip install .*\s\.(\s|$)", a) for k, a in steps), "pip install ."
    entrypoint = [a for k, a in steps if k == "ENTRYPOINT"]
    assert entrypoint and json.loads(entrypoint[-1]) == ["ls-backend", "worker"]
    env = " ".join(a for k, a in steps if k == "ENV")
    assert re.search(r"\bMODEL_DIR=/data/models\b", env) and re.search(r"\bDEVICE=auto\b", env)
    check = next(a for k, a in steps if k == "HEALTHCHECK")
    assert "Worker.all" in check and "REDIS_URL" in check, "healthy while its rq worker is registered"
