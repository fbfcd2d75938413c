#!/usr/bin/env bash
# The PML version matrix: the parity tests against each PML release that pyproject.toml admits
# (pytorch-metric-learning>=2.6,<3), then the version pip resolved for the main run is restored.
# That version itself is skipped here: the main test run has just run the whole suite on it.
# Runs inside the CI venv that .ci/run made, from a directory outside the repository.
# PML_VERSIONS overrides the list; each parity run takes ~20-30 s on 2 cores. pytest runs -q -x
# (the -q comes from addopts in pyproject.toml; a second -q would hide the closing count line).
set -euo pipefail
REPO="${REPO:-$(cd "$(dirname "$0")/.." && pwd)}"
VERSIONS="${PML_VERSIONS:-2.6.0 2.7.0 2.8.1 2.9.0}"

modules=()
for m in test_losses_ms test_miners test_memory test_adaptive test_kernel; do
    if [ -f "$REPO/tests/$m.py" ]; then modules+=("$REPO/tests/$m.py"); else echo "skip missing tests/$m.py"; fi
done
if [ "${#modules[@]}" -eq 0 ]; then echo "no parity test modules found: matrix skipped"; exit 0; fi

pml_version() { python -c "import pytorch_metric_learning as p; print(p.__version__)"; }
original="$(pml_version)"
restore() { python -m pip install -q --no-deps "pytorch-metric-learning==$original"; }
TMP="$(mktemp -d)"
trap 'restore; rm -rf "$TMP"' EXIT

cd "$TMP"  # outside the repository: the installed wheel is what the tests import
results=()
for v in $VERSIONS; do
    if [ "$v" = "$original" ]; then  # the main test run just ran every test module on it
        results+=("PML $v: covered by the main test run")
        continue
    fi
    printf '\n-- pytorch-metric-learning==%s\n' "$v"
    python -m pip install -q --no-deps "pytorch-metric-learning==$v"
    start=$SECONDS
    PYTHONPATH="$REPO/.ci" python -m pytest "${modules[@]}" -c "$REPO/pyproject.toml" -p ci_installed -p no:cacheprovider -x \
        || { echo "PML $v: parity tests FAILED"; exit 1; }
    results+=("PML $(pml_version): passed in $((SECONDS - start))s")
done
restore
trap 'rm -rf "$TMP"' EXIT
printf '\nPML matrix (restored %s):\n' "$(pml_version)"
printf '  %s\n' "${results[@]}"
