#!/usr/bin/env bash
# The image pipeline of `pml-ms-plus ablate`, for real (issue #10): a second virtual environment with
# the torch 2.14.1 + torchvision 0.29.1 pair (the CPU torch 2.13.0 of the main run cannot import
# PyPI's torchvision; this pair installs from local disk in about a minute and runs on the CPU), the
# built WHEEL installed into it with [test,vision], then, from outside the repository:
#   1. the image tests (tests/test_ablation_images.py, test_ablation_metrics.py); with
#      PML_MS_PLUS_REQUIRE_VISION=1 a missing torchvision fails them instead of skipping them
#   2. the README's CUB recipe end to end on a generated CUB-200-2011 folder, through the console
#      script (shortened: resnet18 from random weights at 32x32, one epoch, one seed)
# Called by .ci/run after the wheel is built; WHEEL and VISION_VENV override the defaults.
set -euo pipefail
REPO="${REPO:-$(cd "$(dirname "$0")/.." && pwd)}"
WHEEL="${WHEEL:-$(ls "$REPO"/dist/*.whl)}"
VENV="${VISION_VENV:-$REPO/.venv-ci/vision}"  # inside .venv-ci: ignored by git and ruff, re-created each run
start=$SECONDS

rm -rf "$VENV"
python3 -m venv "$VENV"
PY="$VENV/bin/python"
LOG="$VENV/install.log"
{
    "$PY" -m pip install --upgrade pip
    "$PY" -m pip install torch==2.14.1 torchvision==0.29.1
    "$PY" -m pip install "${WHEEL}[test,vision]"
} > "$LOG" 2>&1 || { cat "$LOG"; exit 1; }
# the wheel's own dependencies must not have replaced the pair
"$PY" - <<'PY'
import scipy, torch, torchvision
print(f"vision venv: torch {torch.__version__}, torchvision {torchvision.__version__}, scipy {scipy.__version__}")
assert torch.__version__.split("+")[0] == "2.14.1", torch.__version__
assert torchvision.__version__.split("+")[0] == "0.29.1", torchvision.__version__
PY
echo "vision venv ready in $((SECONDS - start))s"

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
cd "$TMP"  # outside the repository: the installed wheel is what runs
t=$SECONDS
PML_MS_PLUS_REQUIRE_VISION=1 PYTHONPATH="$REPO/.ci" "$PY" -m pytest \
    "$REPO/tests/test_ablation_images.py" "$REPO/tests/test_ablation_metrics.py" \
    -c "$REPO/pyproject.toml" -p ci_installed -p no:cacheprovider
echo "image tests: $((SECONDS - t))s"

t=$SECONDS
"$PY" "$REPO/examples/make_cub200_layout.py" "$TMP/data"
"$VENV/bin/pml-ms-plus" ablate --dataset cub200 --data-root "$TMP/data" --config "$REPO/examples/cub200_ms.toml" \
    --backbone resnet18 --pretrained none --image-size 32 --epochs 1 --seeds 1 --workers 2 \
    --out "$TMP/cub_out" > "$TMP/cub.log" 2> "$TMP/cub.err" || { cat "$TMP/cub.log" "$TMP/cub.err"; exit 1; }
grep -q "200 training images of 100 classes; 200 test images of 100 classes" "$TMP/cub_out/summary.md"
grep -c '^done: ' "$TMP/cub.log" | grep -qx 5
echo "CUB recipe on a generated CUB-200-2011 folder: 5 runs, summary.md written, $((SECONDS - t))s"
echo "vision part: $((SECONDS - start))s"
