#!/usr/bin/env bash
# GPU check for emseg: on a machine with CUDA, run the GPU-marked tests and the predict
# benchmark on the GPU(s), then `emseg segment` end to end (benchmarks/bench_segment.py: each stage's
# share of the run and the forward-only limit), and print the figures, in under 9 minutes; without
# CUDA, say why and skip.
#
#   benchmarks/gpu_check.sh                  # uses .venv/bin/python (or $PYTHON)
#   PYTHON=/path/to/python benchmarks/gpu_check.sh
#   GPU_CHECK_SHAPE=32,1024,1024 benchmarks/gpu_check.sh   # benchmark volume (ISBI tiled), default 32x1024x1024
#
# Exit status: 0 when everything ran (or was skipped for lack of CUDA), non-zero when a test or the
# benchmark failed.  The figures are printed and written to $GPU_CHECK_OUT (default: a temp folder).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
SHAPE=${GPU_CHECK_SHAPE:-32,1024,1024}
OUT=${GPU_CHECK_OUT:-$(mktemp -d -t emseg-gpu-check-XXXX)}
mkdir -p "$OUT"

reason=$("$PYTHON" - <<'PY'
import torch
if torch.version.cuda is None:
    print(f"torch {torch.__version__} is built without CUDA")
elif not torch.cuda.is_available():
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device")
PY
)
if [[ -n "$reason" ]]; then
    echo "gpu_check: SKIPPED: $reason"
    exit 0
fi

start=$SECONDS
"$PYTHON" - <<'PY' | tee "$OUT/device.txt"
import torch
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"gpu {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}; torch {torch.__version__}")
PY

set +e  # collect both exit statuses
echo "== GPU-marked tests"
timeout 150 "$PYTHON" -m pytest -m "gpu and not cluster" tests -q -p no:cacheprovider -n 0 2>&1 | tee "$OUT/tests.txt" | tail -n 15
tests_rc=${PIPESTATUS[0]}

echo "== predict benchmark on the GPU (volume $SHAPE)"
timeout $((280 - (SECONDS - start))) "$PYTHON" benchmarks/bench_predict.py --device cuda --shape "$SHAPE" \
    --json "$OUT/bench_predict.json" 2>&1 | tee "$OUT/bench_predict.txt"
bench_rc=${PIPESTATUS[0]}

echo "== emseg segment end to end on the GPU (volume $SHAPE): each stage's share, forward-only limit"
# two rounds: each runs the fragments beside the prediction and --no-overlap, the order alternating
# (a round's first run meets cold workers); every round's figures are printed as it ends
timeout 270 "$PYTHON" benchmarks/bench_segment.py --device cuda --shape "$SHAPE" --rounds 2 --blocks 1 --no-3d \
    --json "$OUT/bench_segment.json" 2>&1 | tee "$OUT/bench_segment.txt"
segment_rc=${PIPESTATUS[0]}

echo "gpu_check: tests exit $tests_rc, predict benchmark exit $bench_rc, segment benchmark exit $segment_rc," \
     "$((SECONDS - start)) s; figures in $OUT"
[[ $tests_rc -eq 0 && $bench_rc -eq 0 && $segment_rc -eq 0 ]]
