"""One logging format for every process (web workers, job runner, CLI)."""

from __future__ import annotations

import logging
import os

FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"


def configure(level: str = "INFO") -> None:
    root = logging.getLogger()
    if not any(getattr(h, "_ls_backend", False) for h in root.handlers):
        handler = logging.StreamHandler()
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
