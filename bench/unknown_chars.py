"""What reading unknown characters apart costs the tokenizer (``text.readable``).

Usage::

    .venv/bin/python bench/unknown_chars.py [--n 5000] [--repeats 5]

``Encoder.tokenize`` splits each character the vocabulary reads only as ``[UNK]`` (an emoji, most
symbols) off the word it touches before the fast tokenizer runs.  Measured on AG News test texts as
they are (almost all ASCII: the rule returns at once) and on the same texts with an emoji glued to
every fifth word (the rule rewrites every text), beside the same tokenizer core without the rule,
interleaved run by run; the best of ``--repeats`` counts.  Also how many words the rule gives back:
tokens other than ``[UNK]`` in the emoji texts, with and without it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.support.data import agnews  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="texts (default 5000)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per contender; the best counts (default 5)")
    args = parser.parse_args()

    from ls_backend.model import Encoder, resolve_device
    from ls_backend.settings import bundled_encoder_path
    from ls_backend.text import utf8_safe

    encoder = Encoder(bundled_encoder_path(), resolve_device("cpu"), 128, "float32")
    plain = [text for text, _ in agnews("test", limit=args.n)]
    emoji = ["".join(w + ("😀" if i % 5 == 4 else "") + " " for i, w in enumerate(t.split())).strip() for t in plain]
    core = encoder._bulk_tokenizer(encoder.max_length)
    unk = encoder.tokenizer.unk_token_id

    def ours(texts):
        return encoder._tokenize_chunk(texts, encoder.max_length)

    def without(texts):  # the same core, without the rule
        return [e.ids for e in core.encode_batch_fast([utf8_safe(t) for t in texts])]

    print(f"{len(plain)} AG News test texts, the bundled encoder's tokenizer, one thread")
    for name, texts in (("as they are", plain), ("an emoji glued to every fifth word", emoji)):
        best = {"ours": float("inf"), "without": float("inf")}
        for _ in range(args.repeats):
            for contender, run in (("ours", ours), ("without", without)):
                started = time.perf_counter()
                run(texts)
                best[contender] = min(best[contender], time.perf_counter() - started)
        rate = {k: len(texts) / v for k, v in best.items()}
        print(f"  {name}: {rate['ours']:,.0f} texts/s with the rule, {rate['without']:,.0f} without "
              f"({rate['ours'] / rate['without']:.2f}x)")
    read = {k: sum(sum(1 for i in ids if i != unk) for ids in run(emoji)) for k, run in (("ours", ours), ("without", without))}
    print(f"  tokens other than [UNK] in the emoji texts: {read['ours']:,} with the rule, {read['without']:,} without")


if __name__ == "__main__":
    main()
