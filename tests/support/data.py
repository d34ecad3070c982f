"""The real labeled data in ../shared/data (absent on a user's machine: tests skip, or fail in CI)."""

from __future__ import annotations

import csv
from pathlib import Path

from .services import unavailable

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
AGNEWS_LABELS = ["World", "Sports", "Business", "Sci/Tech"]


def data_file(*parts: str) -> Path:
    path = DATA.joinpath(*parts)
    if not path.exists():
        unavailable(f"real data {path} is not here (it lives in ../shared/data beside the repository)")
    return path


def agnews(split: str = "test", limit: int | None = None, offset: int = 0) -> list[tuple[str, str]]:
    """(text, label name) rows of AG News; labels are World, Sports, Business, Sci/Tech."""
    rows = []
    with open(data_file("agnews", f"{split}.tsv"), newline="", encoding="utf-8") as handle:
        for i, row in enumerate(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)):
            if i < offset:
                continue
            if limit is not None and len(rows) >= limit:
                break
            rows.append((row[0], row[1]))
    return rows


def sst2(split: str = "test", limit: int | None = None, min_words: int = 0) -> list[tuple[str, int]]:
    rows = []
    with open(data_file("sst2", f"{split}.tsv"), newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)
        for row in reader:
            if len(row[0].split()) < min_words:
                continue
            rows.append((row[0].strip(), int(row[1])))
            if limit is not None and len(rows) >= limit:
                break
    return rows
