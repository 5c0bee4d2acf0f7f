#!/usr/bin/env bash
# Set up RadBridge on a fresh Debian 12 machine with Python 3.11 (run as root).
#   bash scripts/setup.sh            runtime only (what `radbridge demo` needs)
#   bash scripts/setup.sh test       + the real peers (dcmtk, dicom3tools, Orthanc + DICOMweb)
#                                      and the test extra (torch CPU, transformers, pytest)
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-runtime}"
PY="${PYTHON:-python3}"

if [ "$mode" = "test" ]; then
  need=()
  for tool in storescu dciodvfy dsrdump Orthanc; do
    command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || need+=("$tool")
  done
  [ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=("orthanc-dicomweb")
  if [ "${#need[@]}" -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends dcmtk dicom3tools orthanc orthanc-dicomweb
  fi
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "$mode" = "test" ]; then
  # The local CPU wheel; an unpinned torch would pull several GB of CUDA packages.
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[test]"
else
  .venv/bin/python -m pip install -q -e .
fi
