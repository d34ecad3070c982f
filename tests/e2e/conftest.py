"""End-to-end fixtures: a real Label Studio 1.23.2 talking to the real backend over HTTP.

Label Studio comes from ``scripts/ensure-label-studio.sh`` (its own virtualenv and a migrated
template data folder under ``$LS_BACKEND_CACHE``, default ``~/.cache/ls-backend``). When it is
missing the fixture runs that script; when that is impossible the tests are skipped with the
reason, except under ``CI=true``, where they fail. An installed Label Studio that does not start
always fails.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.label_studio import (
    ENSURE_SCRIPT,
    LabelStudio,
    LabelStudioError,
    ensure_installed,
    is_installed,
)

E2E_DIR = Path(__file__).resolve().parent


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def unavailable(reason: str) -> None:
    """Fail under CI=true, skip elsewhere; always say why."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: end-to-end prerequisites must be present)", pytrace=False)
    pytest.skip(reason)


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: end-to-end test against a real Label Studio and the backend server (slow)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if E2E_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def label_studio():
    """A started Label Studio on 127.0.0.1 with an empty database; stopped after the session."""
    if not is_installed():
        try:
            ensure_installed()
        except LabelStudioError as exc:
            unavailable(f"Label Studio is not available and {ENSURE_SCRIPT.name} could not prepare it: {exc}")
    server = LabelStudio()
    try:
        server.start()
    except LabelStudioError as exc:
        # installed but broken is a real failure everywhere, not a missing prerequisite
        server.stop()
        pytest.fail(f"Label Studio did not start: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()
