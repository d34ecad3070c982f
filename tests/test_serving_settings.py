"""Serving settings refused at start-up, with the fix in the message, instead of failing requests later."""

from __future__ import annotations

import os
from dataclasses import fields

import pytest

from ls_backend.labeling import plan_for
from ls_backend.model import label_prompts
from ls_backend.settings import Settings, SettingsError

from .conftest import TOPIC_CONFIG

FLOAT_SETTINGS = [f.name.upper() for f in fields(Settings) if f.type == "float"]


def test_every_float_setting_is_covered():
    assert {"LEARNING_RATE", "ZERO_SHOT_TEMPERATURE", "VERSION_CHECK_INTERVAL", "EVAL_SHARE"} <= set(FLOAT_SETTINGS)


@pytest.mark.parametrize("raw", ["nan", "NaN", "inf", "-inf", "1e400"])
@pytest.mark.parametrize("name", FLOAT_SETTINGS)
def test_float_settings_refuse_values_that_are_not_finite(name, raw):
    with pytest.raises(SettingsError, match=rf"^{name}='{raw}': expected a finite number$"):
        Settings.from_env({name: raw})


@pytest.mark.parametrize("template", ["{label} {x}", "about {label} {}", "{label} {0}",
                                      "{label", "{label} }", "{label!z}"])
def test_a_zero_shot_template_with_other_fields_is_refused_with_how_to_write_braces(template):
    with pytest.raises(SettingsError, match=r"ZERO_SHOT_TEMPLATE=.*write literal braces as \{\{ and \}\}"):
        Settings.from_env({"ZERO_SHOT_TEMPLATE": template})


@pytest.mark.parametrize("template", ["a review", "{{label}}"])
def test_a_zero_shot_template_must_fill_in_the_label(template):
    with pytest.raises(SettingsError, match=r"must contain \{label\}"):
        Settings.from_env({"ZERO_SHOT_TEMPLATE": template})


def test_a_zero_shot_template_with_literal_braces_makes_the_prompts():
    settings = Settings.from_env({"ZERO_SHOT_TEMPLATE": "{{news}} about {label}"})
    control = plan_for(TOPIC_CONFIG).controls[0]
    assert label_prompts(control, settings.zero_shot_template)[:2] == ["{news} about World", "{news} about Sports"]


@pytest.mark.parametrize("env, fix", [
    ({"SEED": str(2**32)}, "at most 4294967295"),  # numpy's seeds are 32-bit: every job failed
    ({"CACHE_MAX_ROWS": "-1"}, "CACHE_MAX_ROWS"),
    ({"REDIS_URL": "localhost:6379"}, "redis://host:6379/0"),
    ({"DATABASE_URL": "sqlite:foo"}, "sqlite:////absolute/path/store.sqlite"),
    ({"BASE_MODEL": "/nonexistent/model"}, "no model folder there"),
    # a cron expression that names no time (February 30th) killed the schedule; one of seconds ran every second
    ({"TRAIN_SCHEDULE": "0 0 30 2 *"}, "never comes due"),
    ({"TRAIN_SCHEDULE": "* * * * * *"}, "at least 10 seconds apart"),
    # a port or database that is no number: a traceback at the first use, or db 0 without a word
    ({"REDIS_URL": "redis://127.0.0.1:abc/12"}, "its port is not a number"),
    ({"REDIS_URL": "redis://127.0.0.1:6379/notadb"}, "the database after the host is a number"),
    ({"DATABASE_URL": "postgresql://u:pw@127.0.0.1:notaport/db"}, "DATABASE_URL: cannot be read"),
    # one store per process (in memory), or per working folder (relative): labels lost between them
    ({"DATABASE_URL": "sqlite://"}, "SQLite needs an absolute file path"),
    ({"DATABASE_URL": "sqlite:///relative.sqlite"}, "SQLite needs an absolute file path"),
    ({"LABEL_STUDIO_URL": "localhost:8080"}, "http://host:8080"),
    # a port that is no port: every refresh and sync failed later with urllib3's words
    ({"LABEL_STUDIO_URL": "http://ls:80x80"}, "the port after the host is a number"),
    ({"LABEL_STUDIO_URL": "http://ls:99999"}, "the port after the host is a number"),
    ({"LABEL_STUDIO_URL": "http://ls:0"}, "port 0 is no server's port"),
    ({"QUEUE_NAME": "  "}, "QUEUE_NAME is blank"),
    ({"PREDICT_TIME_BUDGET": "-1"}, "PREDICT_TIME_BUDGET='-1': must lie in"),
    ({"MODEL_DIR": "~nosuchuser/models"}, "MODEL_DIR='~nosuchuser/models': .*write the path out in full"),
])
def test_settings_that_would_fail_every_job_or_the_first_request_are_refused_at_start(env, fix):
    with pytest.raises(SettingsError, match=fix.replace("(", r"\(").replace("/", "/")):
        Settings.from_env(env)


def test_a_blank_switch_keeps_its_default():
    # "  " (a template that filled nothing in) turned the job standby off, where "" leaves it on
    assert Settings.from_env({"JOB_STANDBY": "  ", "FORCE_PROMOTE": " "}).job_standby is True
    assert Settings.from_env({"JOB_STANDBY": " off "}).job_standby is False
    assert Settings.from_env({"FORCE_PROMOTE": " "}).force_promote is False
    assert Settings.from_env({"LABEL_STUDIO_URL": "https://ls.example:8443/"}).label_studio_url == "https://ls.example:8443"


def test_base_model_expands_the_home_folder(tmp_path, monkeypatch):
    model = tmp_path / "encoder"
    model.mkdir()
    (model / "config.json").write_text("{}")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert Settings.from_env({"BASE_MODEL": "~/encoder"}).base_model == str(model)
    assert Settings.from_env({"SEED": str(2**32 - 1)}).seed == 2**32 - 1


def test_passwords_in_url_queries_are_masked_too(tmp_path):
    from ls_backend.store import CorrectionStore

    shown = Settings.from_env({"REDIS_URL": "redis://127.0.0.1:6379/15?password=s3cret",
                               "DATABASE_URL": "postgresql://u:pw@db:5432/ls?sslpassword=k3y&sslmode=require"}).describe()
    assert "s3cret" not in shown["redis_url"] and shown["redis_url"].endswith("?password=***")
    assert "pw@" not in shown["database_url"] and "k3y" not in shown["database_url"]
    # a password with "?" in it (SQLAlchemy reads it whole) was shown as part of a query string
    tricky = Settings.from_env({"DATABASE_URL": "postgresql://u:pa?ss@db:5432/x",
                                "LABEL_STUDIO_URL": "http://admin:hunter2@ls:8080"}).describe()
    assert tricky["database_url"] == "postgresql://u:***@db:5432/x"
    assert tricky["label_studio_url"] == "http://admin:***@ls:8080"
    assert "sslpassword=***" in shown["database_url"] and "sslmode=require" in shown["database_url"]
    store = CorrectionStore(f"sqlite:///{tmp_path / 'store.sqlite'}?password=s3cret")
    try:
        assert "s3cret" not in store.describe()
    finally:
        store.close()


@pytest.mark.parametrize("argv", [["serve", "--port", "99999"], ["rank", "--project", "3", "--seed", "-1"],
                                  ["rank", "--project", "3", "--n", "0"], ["train", "--project", "3", "--timeout", "nan"],
                                  ["train", "--project", "3", "--timeout", "-1"],
                                  ["cache", "--prune", "--older-than", "36501"], ["cache", "--prune", "--older-than", "nan"]])
def test_command_line_values_out_of_range_are_usage_errors(argv, capsys):
    from ls_backend import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2 and "error: argument --" in capsys.readouterr().err


def test_a_queue_or_store_that_cannot_be_reached_is_one_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    from ls_backend import cli

    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")  # nothing listens there
    assert cli.main(["jobs"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ls-backend: Redis (REDIS_URL) cannot be reached") and "Traceback" not in err
    monkeypatch.setenv("REDIS_URL", "")
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:p@127.0.0.1:1/db")
    assert cli.main(["status"]) == 1
    assert capsys.readouterr().err.startswith("ls-backend: the corrections store cannot be opened")


@pytest.mark.parametrize("env, fix", [({"DEVICE": "cuda"}, "DEVICE=auto or cpu"),
                                      ({"INFERENCE_PRECISION": "float16"}, "use bfloat16 or float32")])
@pytest.mark.parametrize("command", ["serve", "worker"])
def test_settings_that_need_cuda_are_refused_at_start_on_a_machine_without_it(env, fix, command, monkeypatch, capsys):
    """Each web worker (and each job) would otherwise fail as it loads the encoder: gunicorn's master
    then exits with "Worker failed to boot" and the reason lies in a traceback above it."""
    import torch

    from ls_backend import cli, commands

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the settings are valid here")
    started = []
    monkeypatch.setattr(cli, "serve", lambda *args: started.append(args) or 0)
    monkeypatch.setattr(commands, "run", lambda *args: started.append(args) or 0)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main([command]) == 2
    assert started == [] and fix in capsys.readouterr().err
    monkeypatch.delenv(next(iter(env)))
    assert cli.main([command]) == 0 and len(started) == 1  # the same command with the setting left out starts


def test_a_torch_that_cannot_be_imported_is_named_as_such_not_as_no_cuda(monkeypatch):
    from ls_backend import cli

    monkeypatch.setattr(cli.sys, "executable", "/bin/false")  # a child that fails, as a broken torch does
    problem = cli._device_problem(Settings(device="cuda"))
    assert problem is not None and problem.startswith("torch cannot be imported")
    assert cli._device_problem(Settings()) is None  # nothing asked of CUDA: no probe at all


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_a_base_model_folder_that_will_not_load_is_refused_at_start(command, tmp_path, monkeypatch, capsys):
    """A folder with a config.json alone passed the settings, then every web worker failed to boot
    (gunicorn's 60-line log never named BASE_MODEL); a real model folder starts."""
    from ls_backend import cli, commands
    from ls_backend.settings import bundled_encoder_path

    broken = tmp_path / "model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    started = []
    monkeypatch.setattr(cli, "serve", lambda *args: started.append(args) or 0)
    monkeypatch.setattr(commands, "run", lambda *args: started.append(args) or 0)
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("BASE_MODEL", str(broken))
    assert cli.main([command]) == 2
    said = capsys.readouterr().err
    assert started == [] and f"bad setting: BASE_MODEL={broken}" in said and "model_type" in said
    monkeypatch.setenv("BASE_MODEL", bundled_encoder_path())
    assert cli.main([command]) == 0 and len(started) == 1


def test_the_embedding_cache_goes_under_the_users_cache_folder(tmp_path, monkeypatch):
    """CACHE_DIR unset: $XDG_CACHE_HOME/ls-backend/models-<hash>, else ~/.cache (the test session
    sets XDG_CACHE_HOME to a folder of its own, so runs leave nothing in the home folder)."""
    from pathlib import Path

    settings = Settings(model_dir=tmp_path / "models")
    assert settings.local_cache_dir.parent == Path(os.environ["XDG_CACHE_HOME"]) / "ls-backend"
    assert not str(settings.local_cache_dir).startswith(str(Path.home() / ".cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert settings.local_cache_dir.parent == tmp_path / "xdg" / "ls-backend"
    for unset in ("", "relative/cache"):  # not an absolute path: the XDG rule says to ignore it
        monkeypatch.setenv("XDG_CACHE_HOME", unset)
        assert settings.local_cache_dir.parent == Path.home() / ".cache" / "ls-backend"
    assert Settings(model_dir=tmp_path / "models", cache_dir=str(tmp_path / "mine")).local_cache_dir == tmp_path / "mine"


def test_the_log_follows_stderr_when_it_is_swapped_and_closed(capsys):
    """A process's log handler writes to the stderr of the moment: after the stream it started on is
    closed (a test's capture ending, say), records still reach stderr, without a "Logging error"."""
    import io
    import logging
    import sys

    from ls_backend.logs import configure

    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    first = io.StringIO()
    saved, sys.stderr = sys.stderr, first
    try:
        configure("INFO")
        logging.getLogger("ls_backend.test").info("while the first stream is open")
    finally:
        sys.stderr = saved
    assert "while the first stream is open" in first.getvalue()
    first.close()
    try:
        logging.getLogger("ls_backend.test").info("after it was closed")
    finally:
        for handler in root.handlers[:]:
            if handler not in before:
                root.removeHandler(handler)
        root.setLevel(level)
    err = capsys.readouterr().err
    assert "after it was closed" in err and "Logging error" not in err


@pytest.mark.parametrize("left_out", ["vocabulary", "weights"])
def test_a_half_copied_base_model_folder_is_refused_where_it_would_read_every_text_alike(left_out, tmp_path):
    """Without its vocabulary files, transformers builds a tokenizer of a few tokens that reads every word
    as unknown: the folder passed the start check, and every text got one embedding. Without weights,
    the encoder would be random."""
    import shutil
    from pathlib import Path

    from ls_backend import cli
    from ls_backend.settings import bundled_encoder_path

    half = tmp_path / "model"
    shutil.copytree(bundled_encoder_path(), half)
    patterns = (("tokenizer*", "vocab.txt", "special_tokens_map.json") if left_out == "vocabulary"
                else ("*.safetensors", "pytorch_model*.bin"))
    for pattern in patterns:
        for path in Path(half).glob(pattern):
            path.unlink()
    problem = cli._base_model_problem(Settings(base_model=str(half)))
    assert problem is not None and f"BASE_MODEL={half}" in problem
    assert ("unknown" if left_out == "vocabulary" else "no weights file") in problem, problem


def test_settings_refuse_a_blank_folder_and_a_job_timeout_rq_cannot_keep(tmp_path):
    from ls_backend.settings import SettingsError

    for name in ("MODEL_DIR", "CACHE_DIR"):
        with pytest.raises(SettingsError, match=name):
            Settings.from_env({name: "   "})  # it was the current folder
    with pytest.raises(SettingsError, match="JOB_TIMEOUT"):
        Settings.from_env({"JOB_TIMEOUT": "2000000000"})  # rq's alarm of 2x that overflowed: every job failed
    assert Settings.from_env({"JOB_TIMEOUT": "1000000000"}).job_timeout == 10**9


def test_the_cli_names_the_file_and_refuses_rank_on_a_device_it_lacks(tmp_path, monkeypatch, capsys):
    from ls_backend import cli

    models = tmp_path / "models"
    models.mkdir()
    (models / "jobs.sqlite").write_text("not a database")
    monkeypatch.setenv("MODEL_DIR", str(models))
    monkeypatch.setenv("CACHE_DIR", str(tmp_path / "cache"))
    assert cli.main(["jobs"]) == 1
    said = capsys.readouterr().err
    assert "jobs.sqlite under MODEL_DIR" in said  # it blamed the embedding cache alone
    # rank predicts in its own process (a refresh): the device check applies to it too
    import torch

    if not torch.cuda.is_available():
        monkeypatch.setenv("DEVICE", "cuda")
        assert cli.main(["rank", "--project", "3"]) == 2
        assert "bad setting: DEVICE=cuda" in capsys.readouterr().err


def test_versions_name_the_version_that_serves_where_the_pointer_names_one_that_does_not_load(tmp_path):
    import numpy as np

    from ls_backend.commands import versions_answer
    from ls_backend.model import ClassifierHead
    from ls_backend.registry import ModelRegistry

    settings = Settings(model_dir=tmp_path / "models")
    registry = ModelRegistry(settings.model_dir)
    key = "3.1732665262"
    head = {"topic": ClassifierHead(labels=["a", "b"], weight=np.zeros((2, 4), np.float32), bias=np.zeros(2, np.float32))}
    version = registry.create_version(key, head, {"kind": "cold-start"})
    registry.promote(key, version)
    (registry.project_dir(key) / "current").write_text("p3-v9\n")  # names no version
    answer = versions_answer(settings, registry, key)
    assert (answer["current"], answer["current_pointer"]) == (version, "p3-v9")
    assert [row["version"] for row in answer["versions"] if row["current"]] == [version]
