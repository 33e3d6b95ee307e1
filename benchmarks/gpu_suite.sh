#!/usr/bin/env bash
# The GPU checks and measurements of issue 19 in one script, for the lent machine as it is
# (Python 3.12, torch 2.11, Triton 3.6, timm, no network): run from the repository root,
#
#   bash benchmarks/gpu_suite.sh            # on the GPU: about 6 minutes on one H200/H100
#   bash benchmarks/gpu_suite.sh --smoke    # CPU dry run, tiny shapes (a test runs this)
#
# Steps (each one's output goes to $OUT/<step>.log; a failed step is reported, the rest go on):
#   1. env            versions, GPU name
#   2. cuda_tests     pytest -m cuda on the Triton kernels, the sensor and LAMB
#   3. stats_overhead benchmarks/stats_overhead.py: ResNet-18-GN batch 256, a GPT-2-small-shaped
#                     decoder in bf16 at sequence 1024 batch 8, ViT-B/16 batch 128
#   4. optim_speed    benchmarks/optim_speed.py: LAMB against timm, pytorch-optimizer (skipped
#                     with a note where it is not installed) and fused AdamW, with the copy
#                     bandwidth measured in the same rounds
#   5. resnet50       benchmarks/gpu_resnet50.py: images/s of the whole stack against plain
# Results: $OUT (default benchmarks/results/gpu; --out DIR); summary in $OUT/summary.md.
# The project runs from its source (PYTHONPATH); python: $PYTHON, else python3.
# Step limits add up to 480 s. On the lent machine (one call, at most 8 files come back), e.g.:
#   bash benchmarks/gpu_suite.sh --out /tmp/gpu; tar -czf $OUT/gpu.tgz -C /tmp gpu
# then unpack gpu.tgz into benchmarks/results/ here and commit it with the device named.
set -uo pipefail

SMOKE=0
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) SMOKE=1 ;;
        --out) OUT="$2"; shift ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT" || exit 1
PY="${PYTHON:-python3}"
if [ -z "$OUT" ]; then
    if [ "$SMOKE" = 1 ]; then OUT="$ROOT/benchmarks/results/gpu/smoke"; else OUT="$ROOT/benchmarks/results/gpu"; fi
fi
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.md"
FAILED=0
START=$(date +%s)
{
    echo "# GPU suite $( [ "$SMOKE" = 1 ] && echo '(smoke: CPU dry run, no measurement)')"
    echo
    echo "- started $(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >"$SUMMARY"

# run NAME LIMIT_SECONDS CMD...: run one step with a time limit, log it, record the outcome
run() {
    local name="$1" limit="$2"
    shift 2
    local t0=$(date +%s)
    echo "== $name: $*"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    local secs=$(( $(date +%s) - t0 ))
    tail -n 25 "$OUT/$name.log"
    if [ $rc -eq 0 ]; then
        echo "- $name: ok (${secs} s)" >>"$SUMMARY"
    else
        [ $rc -eq 124 ] && echo "- $name: TIMED OUT after ${limit} s" >>"$SUMMARY" \
            || echo "- $name: FAILED (exit $rc, ${secs} s; see $name.log)" >>"$SUMMARY"
        FAILED=1
    fi
}

run env 30 "$PY" - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
for name in ("triton", "torchvision", "timm", "pytorch_optimizer", "lightning", "transformers"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as err:  # a missing peer is a note, not a failure
        print(name, "MISSING:", type(err).__name__, err)
EOF

TESTS=(tests/stats/test_stats_triton.py tests/optim/test_lamb_triton.py tests/optim/test_optim_lamb.py)
if [ "$SMOKE" = 1 ]; then
    # no GPU: every CUDA test must be collected and skipped, not fail
    run cuda_tests 300 "$PY" -m pytest -m cuda "${TESTS[@]}" -q -rs -p no:cacheprovider
    run stats_overhead 300 "$PY" benchmarks/stats_overhead.py --device cpu \
        --models resnet18gn-tiny gpt2s-tiny vitb16-tiny --batches 2 2 2 \
        --methods plain ours_norms --rounds 1 --steps 1 --warmup 1 --out "$OUT/stats_overhead"
    run optim_speed 300 "$PY" benchmarks/optim_speed.py --device cpu --sets resnet18 \
        --reps 1 --warmup 1 --copy-mib 8 --out "$OUT/optim_speed"
    run resnet50 300 "$PY" benchmarks/gpu_resnet50.py --smoke --out "$OUT/resnet50"
else
    run cuda_tests 120 "$PY" -m pytest -m cuda "${TESTS[@]}" -q -rs -p no:cacheprovider
    run stats_overhead 180 "$PY" benchmarks/stats_overhead.py --device cuda \
        --models resnet18gn gpt2s vitb16 --batches 256 8 128 \
        --methods plain ours_norms ours_norms_unfused --rounds 3 --steps 3 --warmup 2 \
        --note "gpu_suite.sh" --out "$OUT/stats_overhead"
    run optim_speed 60 "$PY" benchmarks/optim_speed.py --device cuda --reps 10 --warmup 2 \
        --copy-mib 1024 --out "$OUT/optim_speed"
    run resnet50 90 "$PY" benchmarks/gpu_resnet50.py --device cuda --batch 128 \
        --rounds 3 --steps 8 --out "$OUT/resnet50"
fi

echo "- finished $(date -u +%Y-%m-%dT%H:%M:%SZ), $(( $(date +%s) - START )) s in all" >>"$SUMMARY"
cat "$SUMMARY"
exit $FAILED
