#!/usr/bin/env bash
# The main job on the embedded defaults: a synthetic CT study goes in over C-STORE,
# DICOM SEG + SRs come back over C-STORE into ${1:-out/}.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh runtime
.venv/bin/radbridge demo --out "${1:-out}"
