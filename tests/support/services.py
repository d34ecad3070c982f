"""Reach the real services the tests need; in CI a missing one fails, elsewhere it skips with the reason."""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def unavailable(reason: str) -> None:
    """Fail in CI, skip elsewhere, always saying why."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: a missing service is a failure; scripts/test.sh starts it)")
    pytest.skip(f"{reason}; run scripts/test.sh, which starts it")
