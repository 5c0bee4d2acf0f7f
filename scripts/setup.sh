#!/usr/bin/env bash
# Set up RadBridge on a fresh Debian 12 machine with Python 3.11 (run as root).
#   bash scripts/setup.sh            runtime only (what `radbridge demo` needs)
#   bash scripts/setup.sh test       + the real peers (dcmtk, dicom3tools, Orthanc + DICOMweb, openssl for TLS certs),
#                                      Debian chromium (the OHIF browser tests) and the test extra
#                                      (torch CPU, transformers, pytest, playwright) + the slicer extra (dcmqi, slicer-core)
# Both modes unpack the pinned prebuilt OHIF (`radbridge viewer`) into $RADBRIDGE_OHIF_DIR
# (default ~/.cache/radbridge/ohif-<version>), outside the repository; nothing of OHIF is committed.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-runtime}"
PY="${PYTHON:-python3}"

if [ "$mode" = "test" ]; then
  need=()
  for tool in storescu dciodvfy dsrdump Orthanc chromium openssl; do
    command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || need+=("$tool")
  done
  [ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=("orthanc-dicomweb")
  if [ "${#need[@]}" -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends dcmtk dicom3tools orthanc orthanc-dicomweb chromium openssl \
      fontconfig fonts-dejavu-core fonts-wqy-microhei
  fi
  # CJK glyphs for key-image labels (dicom_node.keyimages). Not fatal: without them the CJK test
  # skips, naming the package, and key images draw such labels as empty boxes.
  fonts=(fontconfig fonts-dejavu-core fonts-wqy-microhei)
  if [ ! -f /usr/share/fonts/truetype/wqy/wqy-microhei.ttc ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${fonts[@]}" \
      || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${fonts[@]}"; } \
      || echo "setup: ${fonts[*]} not installed (key-image labels in CJK need them)" >&2
  fi
fi


[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "$mode" = "test" ]; then
  # The local CPU wheel; an unpinned torch would pull several GB of CUDA packages.
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[test,slicer]"
else
  .venv/bin/python -m pip install -q -e .
fi

# The pinned prebuilt OHIF viewer (`radbridge viewer`): the dist/ of `npm pack @ohif/app@<version>`,
# unpacked into a temporary directory beside the target and renamed into place, so the target
# is either absent or complete. The version is OHIF_VERSION in dicom_node/config.py.
install_ohif() {
  local version dir parent tmp tarball
  version="$(sed -n 's/^OHIF_VERSION = "\(.*\)"$/\1/p' dicom_node/config.py)"
  [ -n "$version" ] || { echo "setup: OHIF_VERSION not found in dicom_node/config.py" >&2; return 1; }
  dir="${RADBRIDGE_OHIF_DIR:-$HOME/.cache/radbridge/ohif-$version}"
  [ -f "$dir/index.html" ] && return 0
  if [ -e "$dir" ] && ! rmdir "$dir" 2>/dev/null; then
    echo "setup: $dir exists but holds no OHIF (no index.html); remove it or set RADBRIDGE_OHIF_DIR" >&2
    return 1
  fi
  if ! command -v npm >/dev/null 2>&1; then
    echo "setup: npm is missing: it fetches the prebuilt OHIF $version that 'radbridge viewer' serves." >&2
    echo "setup: apt-get install npm, then run this script again." >&2
    return 1
  fi
  parent="$(dirname "$dir")"
  mkdir -p "$parent"
  tmp="$(mktemp -d "$parent/.ohif-$version.XXXXXX")"
  echo "setup: fetching OHIF $version (npm pack @ohif/app@$version) into $dir"
  if tarball="$(cd "$tmp" && npm pack --silent "@ohif/app@$version" 2>/dev/null | tail -n 1)" \
    && [ -n "$tarball" ] && mkdir "$tmp/unpacked" && tar -xzf "$tmp/$tarball" -C "$tmp/unpacked" \
    && [ -f "$tmp/unpacked/package/dist/index.html" ] \
    && mv -T "$tmp/unpacked/package/dist" "$dir"; then
    rm -rf "$tmp"
    return 0
  fi
  rm -rf "$tmp"
  echo "setup: could not fetch or unpack @ohif/app@$version into $dir" >&2
  return 1
}
if ! install_ohif; then
  # `radbridge demo` does not need OHIF; the browser tests and `radbridge viewer` do.
  [ "$mode" = "test" ] && exit 1
  echo "setup: continuing without OHIF; 'radbridge viewer' will not start until this succeeds." >&2
fi
