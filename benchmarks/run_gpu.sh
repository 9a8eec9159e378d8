#!/usr/bin/env bash
# The GPU benchmarks of issues #4, #5 and #6 on a machine with an NVIDIA GPU and this repository checked out
# (torch and triton already installed; no network needed).
#
#   benchmarks/run_gpu.sh                      # build, tests, linear, optim, conv (about 25 minutes at most)
#   benchmarks/run_gpu.sh build tests          # any subset of the steps, in the order given
#   benchmarks/run_gpu.sh linear optim         #   (a lent machine runs one command for 10 minutes at most:
#   benchmarks/run_gpu.sh conv                 #    split the steps over calls; the build stays between them)
#
# Steps: build (editable install, CUDA kernels for TORCH_CUDA_ARCH_LIST), tests (the `cuda`-marked tests), linear
# (--suite gpu-linear), optim (--suite gpu-optim), conv (--suite gpu-conv), static (the Triton registers/spills
# report; no GPU needed, so not in the default list). Each step has a time limit (seconds, below) so that the
# whole run fits; a step that fails or runs out of time is reported and the next one runs. Results: CSVs, PNGs
# and run_gpu.log under $RESULTS_DIR. The exit status is 1 when any step failed.
#
# Environment (defaults in brackets):
#   RESULTS_DIR [benchmarks/results]   PYTHON [python3]   TORCH_CUDA_ARCH_LIST [9.0a]
#   STK_WHEEL_DIR [.whl]: a stanford_stk-*.whl there is installed into /tmp/stk-site for the stk column (stk is
#     pure Python + Triton; `pip download --no-deps stanford-stk==0.7.1` gives its sdist and `pip wheel --no-deps`
#     a wheel). Without it the stk column says why it is skipped.
#   CONV_BATCH [128]   LINEAR_REPS [20]   OPTIM_REPS [20]   CONV_REPS [5]
#   LIMIT_BUILD [420]  LIMIT_TESTS [240]  LIMIT_LINEAR [300]  LIMIT_OPTIM [120]  LIMIT_CONV [420]  LIMIT_STATIC [600]
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
RESULTS_DIR="${RESULTS_DIR:-benchmarks/results}"
STK_WHEEL_DIR="${STK_WHEEL_DIR:-.whl}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
export PYTHONUNBUFFERED=1
mkdir -p "$RESULTS_DIR"
LOG="$RESULTS_DIR/run_gpu.log"
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(build tests linear optim conv)
FAILED=()

say() { echo "== $(date +%H:%M:%S) $*" | tee -a "$LOG"; }

# run LIMIT NAME COMMAND...: the command under a time limit, its output shown and appended to the log.
run() {
    local limit=$1 name=$2
    shift 2
    say "$name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout --kill-after=30 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local status=${PIPESTATUS[0]}
    if [ "$status" -ne 0 ]; then
        if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then say "$name: ran out of time (${limit}s)"
        else say "$name: failed (exit $status)"; fi
        FAILED+=("$name")
    fi
    say "$name: $((SECONDS - start))s"
}

stk_wheel=$(ls "$STK_WHEEL_DIR"/stanford_stk-*.whl 2>/dev/null | head -n 1)
if [ -n "$stk_wheel" ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --target /tmp/stk-site "$stk_wheel" \
        && export PYTHONPATH="/tmp/stk-site${PYTHONPATH:+:$PYTHONPATH}" \
        && say "stk: installed $stk_wheel into /tmp/stk-site"
else
    say "stk: no stanford_stk-*.whl in $STK_WHEEL_DIR: the stk column will be skipped"
fi

say "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
say "torch $("$PYTHON" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)' 2>&1)"

for step in "${STEPS[@]}"; do
    case "$step" in
        build) run "${LIMIT_BUILD:-420}" build "$PYTHON" -m pip install -q --no-build-isolation --no-deps -e . ;;
        tests) run "${LIMIT_TESTS:-240}" tests "$PYTHON" -m pytest -q -m cuda tests ;;
        linear) run "${LIMIT_LINEAR:-300}" gpu-linear "$PYTHON" -m sparsekern.bench --device cuda --suite gpu-linear \
                    --reps "${LINEAR_REPS:-20}" --out "$RESULTS_DIR" ;;
        optim) run "${LIMIT_OPTIM:-120}" gpu-optim "$PYTHON" -m sparsekern.bench --device cuda --suite gpu-optim \
                   --reps "${OPTIM_REPS:-20}" --out "$RESULTS_DIR" ;;
        conv) run "${LIMIT_CONV:-420}" gpu-conv "$PYTHON" -m sparsekern.bench --device cuda --suite gpu-conv \
                  --batch "${CONV_BATCH:-128}" --reps "${CONV_REPS:-5}" --out "$RESULTS_DIR" ;;
        static) run "${LIMIT_STATIC:-600}" static "$PYTHON" -m sparsekern.bench --static --static-arch 90 \
                    --out "$RESULTS_DIR" ;;
        *) say "unknown step '$step' (build, tests, linear, optim, conv, static)"; FAILED+=("$step") ;;
    esac
done

if [ ${#FAILED[@]} -ne 0 ]; then
    say "failed or out of time: ${FAILED[*]}"
    exit 1
fi
say "all steps passed; results in $RESULTS_DIR"
