"""One logging format for every process (web workers, job runner, CLI)."""

from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"


class StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes, not to the stream it was when the
    handler was made: a process that swaps stderr (a test's capture, a daemon closing it) keeps its
    log instead of a "Logging error" on a closed stream at every record."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # setStream, say: stderr stays stderr
        pass


def configure(level: str = "INFO") -> None:
    root = logging.getLogger()
    if not any(getattr(h, "_ls_backend", False) for h in root.handlers):
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        handler._ls_backend = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    # third-party chatter stays at warning unless we debug
    for name in ("transformers", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
