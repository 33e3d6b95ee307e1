#!/usr/bin/env bash
# Issue 21's grid (benchmarks/lm_pretrain.py) on a lent GPU machine, over as many calls as it
# takes: each call resumes from the runs finished so far and starts no run it could not finish
# before its limit.
#
# Here, once (the GPU machine has no corpora and no `datasets`; it gets the parsed streams):
#   python benchmarks/lm_pretrain.py --prepare-data --cache benchmarks/results/lm_data.npz
# Each call on the lent machine (the device tool's `run`):
#   command: bash benchmarks/lm_pretrain_gpu.sh --limit 480
#   carry:   benchmarks/results/lm_data.npz benchmarks/results/lm_pretrain.partial.json
# then copy the returned lm_pretrain.partial.json into benchmarks/results/ (the next call
# carries it); once the grid is complete the call also returns lm_pretrain.md, .json and .png.
# Locally, a CPU dry run of the same steps: bash benchmarks/lm_pretrain_gpu.sh --smoke
set -uo pipefail

LIMIT=480
SMOKE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --limit) LIMIT="$2"; shift ;;
        --smoke) SMOKE=1 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT" || exit 1
PY="${PYTHON:-python3}"
OUT="${OUT:-$ROOT/benchmarks/results/gpu_lm}"
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

NAME=lm_pretrain
ARGS=(--precision bf16-mixed)
if [ "$SMOKE" = 1 ]; then
    NAME=lm_pretrain_quick
    ARGS=(--quick --seeds 0 1 --growth-rules norm)
fi
CACHE="$ROOT/benchmarks/results/lm_data.npz"
[ "$SMOKE" = 1 ] && CACHE="$OUT/lm_data_quick.npz"
if [ ! -f "$CACHE" ] && [ "$SMOKE" = 0 ]; then
    echo "no $CACHE: build it here first (see the top of this script) and carry it" >&2
    exit 2
fi
# the runs finished so far, carried in, go where --resume looks for them
if [ -f "$ROOT/benchmarks/results/$NAME.partial.json" ]; then
    cp "$ROOT/benchmarks/results/$NAME.partial.json" "$OUT/$NAME.partial.json"
fi
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU"
    "$PY" -c "import torch, lightning, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'lightning', lightning.__version__, 'transformers', transformers.__version__)"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
# the limit leaves a margin for the last run's evaluations and the result files
timeout $((LIMIT + 60)) "$PY" benchmarks/lm_pretrain.py "${ARGS[@]}" --resume \
    --stop-after "$LIMIT" --cache "$CACHE" --out "$OUT" --name "$NAME" 2>&1 | tail -n 40
RC=${PIPESTATUS[0]}
"$PY" - "$OUT/$NAME.partial.json" <<'EOF'
import json, sys
from pathlib import Path

p = Path(sys.argv[1])
runs = json.loads(p.read_text())["runs"] if p.exists() else []
print(f"{len(runs)} runs in {p.name}" if p.exists() else "grid complete (no partial file)")
EOF
exit "$RC"
