#!/usr/bin/env bash
# One GPU call after a change: the GPU suite, the cross-check on CUDA, then the user-level benchmarks, each under
# its own time limit (a step that runs out is cut, the next one still runs), every log and result under $OUT.
#
#   OUT=gpu-results bash benchmarks/gpu_checks.sh        # the limits add up to 14 minutes
#   STEPS="suite crosscheck selection" OUT=gpu-results bash benchmarks/gpu_checks.sh   # about 8 minutes at most
#   STEPS="generate reselect" OUT=gpu-results bash benchmarks/gpu_checks.sh            # about 6 minutes at most
#   STEPS=vllm-tests OUT=gpu-results bash benchmarks/gpu_checks.sh                     # vLLM staged: 7 minutes
#   STEPS=vllm-bench-vllm OUT=gpu-results bash benchmarks/gpu_checks.sh   # vLLM's own backend, 8B shape: 4.5 minutes
#   STEPS=vllm-bench-tca OUT=gpu-results bash benchmarks/gpu_checks.sh    # the same engine with TCA: 4.5 minutes
#   STEPS=vllm-soak OUT=gpu-results bash benchmarks/gpu_checks.sh         # `vllm serve` under load: 9 minutes
#
# With FlashAttention-4 staged, source its environment first; with vLLM staged, vLLM's (not both in one shell).
# This script extends PYTHONPATH, never replaces it.
# The suite runs on 8 workers, one test file per worker (Triton compiles on the CPU; the tests are small).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to a folder for the logs and results}
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
STEPS=${STEPS:-suite crosscheck selection generate reselect}
export VLLM_ENABLE_V1_MULTIPROCESSING=0  # in-process engines: kv_usage() reads the layers of this process
WORKERS=${WORKERS:-8}

step() {  # step NAME SECONDS COMMAND...: run it with a limit, log to $OUT/NAME.log, print its last lines
    local name=$1 limit=$2
    shift 2
    case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc in $((SECONDS - start)) s (limit $limit s)"
    tail -n 4 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
step suite 300 python3 -m pytest -v -n "$WORKERS" --dist loadfile -p no:cacheprovider \
    -m "(gpu or triton or flash) and not vllm" --junitxml="$OUT/suite.xml" tests
step crosscheck 120 python3 -m pytest -q -n "$WORKERS" -p no:cacheprovider tests/test_crosscheck.py
step selection 60 python3 benchmarks/bench_selection.py --out "$OUT/selection.json"
step generate 240 python3 benchmarks/generate_user.py --lengths 32768,131072 --paths dense,dense-graph,tca-graph \
    --new-tokens 32 --repeats 1 --out "$OUT/generate_user.json" --png "$OUT/generate_user.png"
step reselect 120 python3 benchmarks/reselect_decode.py --lengths 32768 --out "$OUT/reselect_decode.json"
step vllm-tests 420 python3 -m pytest -v -p no:cacheprovider -m vllm ${VLLM_TESTS:+-k "$VLLM_TESTS"} --junitxml="$OUT/vllm-tests.xml" \
    tests/serving/test_vllm_gpu.py
read -r -a LENGTHS <<< "${LENGTHS:-16384 32768 65536 131072}"  # prompt lengths of the serving benchmark
SERVING=(--shape llama-3.1-8b --lengths "${LENGTHS[@]}" --batch 1 --max-tokens 33 --dtype bfloat16
         --no-enforce-eager --saturate 8)
step vllm-bench-vllm 270 python3 benchmarks/vllm_serving.py "${SERVING[@]}" --backends vllm \
    --out "$OUT/vllm_8b_flash_attn.json"
step vllm-bench-tca 270 python3 benchmarks/vllm_serving.py "${SERVING[@]}" --backends tca --out "$OUT/vllm_8b_tca.json"
# the served engine (vLLM's defaults: CUDA graphs) under load; its processes find the plugin by tca's entry point
step vllm-soak 540 bash -c "python3 -m pip install -q --no-deps --no-build-isolation -e . && \
    python3 -m pytest -v -p no:cacheprovider -m vllm tests/serving/test_vllm_soak.py"
