from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from ls_backend.model import Encoder
from ls_backend.settings import Settings, bundled_encoder_path
from tests.support.backend import BackendServer
from tests.support.events import TOPIC_CONFIG  # noqa: F401  (tests import it from here)


# the embedding caches of every backend, job and command the tests start (CACHE_DIR unset: under
# XDG_CACHE_HOME) go to one folder of this session, removed at its end, not ~/.cache
_CACHE_HOME = tempfile.mkdtemp(prefix="ls-backend-test-cache-")
os.environ["XDG_CACHE_HOME"] = _CACHE_HOME


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_CACHE_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def encoder() -> Encoder:
    """The bundled encoder, loaded once for the whole session."""
    return Encoder(bundled_encoder_path(), "cpu", 128)


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(model_dir=tmp_path / "models", max_length=128)


@pytest.fixture
def app(settings, encoder):
    from ls_backend.api import create_app
    from ls_backend.predictor import Predictor

    return create_app(settings, Predictor(settings, encoder=encoder))


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture(scope="session")
def backend(tmp_path_factory):
    """The backend started as the README starts it (``ls-backend serve``), on a free port."""
    root = tmp_path_factory.mktemp("backend")
    server = BackendServer(root / "models", env={"WEB_WORKERS": "2"})
    server.start()
    yield server
    server.stop()
