#!/usr/bin/env bash
# The GPU check, one command on a CUDA machine: the CUDA half of the test suite and the benchmark
# against PML on the device, in one report.
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default benchmarks/results/gpu)
# Needs the package installed with its test extra (pip install -e ".[test]") and a CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/results/gpu}"
mkdir -p "$OUT"
python - <<'PY'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device visible to torch")
print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__)
PY
# every device-parametrised test has a `cuda` id; -rs lists anything still skipped
python -m pytest tests -k cuda -p no:cacheprovider -o addopts="" -q -rs 2>&1 | tee "$OUT/tests-cuda.log"
python benchmarks/bench_vs_pml.py --device cuda --out "$OUT" 2>&1 | tee "$OUT/bench-cuda.log"
{
    echo "# GPU check ($(date -u +%Y-%m-%d))"
    echo
    python -c "import torch; print('Device:', torch.cuda.get_device_name(), '- torch', torch.__version__)"
    echo
    echo "Tests (cuda half): $(tail -n 1 "$OUT/tests-cuda.log")"
    echo
    cat "$OUT"/latest-cuda.md 2>/dev/null || tail -n 20 "$OUT/bench-cuda.log"
} > "$OUT/report.md"
echo "wrote $OUT/report.md"
