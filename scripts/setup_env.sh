#!/usr/bin/env bash
# Idempotent set-up of everything the service (or, with "test", the test suite) needs:
#   - .venv (sees the system's packages when the system Python already has torch, e.g. on GPU boxes)
#   - torch: installed (CPU build 2.13.0) only where no torch is importable
#   - the project itself (editable), with the test extras for "test"
#   - Debian packages: ffmpeg (service); espeak-ng, sox, chromium (tests)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
what=${1:-service}
PY=${PYTHON:-python3}

need_apt=()
command -v ffmpeg >/dev/null || need_apt+=(ffmpeg)
if [ "$what" = test ]; then
  command -v espeak-ng >/dev/null || need_apt+=(espeak-ng)
  command -v sox >/dev/null || need_apt+=(sox)
  command -v chromium >/dev/null || need_apt+=(chromium)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] apt-get install ${need_apt[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  else
    echo "[setup] warning: missing system packages: ${need_apt[*]} (install them with your package manager)" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  if $PY -c "import torch" 2>/dev/null; then
    echo "[setup] creating .venv on top of the system's torch"
    $PY -m venv --system-site-packages .venv
  else
    echo "[setup] creating .venv"
    $PY -m venv .venv
  fi
fi
VPY=.venv/bin/python
if ! $VPY -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0 (CPU build)"
  $VPY -m pip install -q torch==2.13.0
fi

stamp=.venv/.installed-$what
want=$(cat pyproject.toml | sha1sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  extra=""; [ "$what" = test ] && extra="[test]"
  echo "[setup] installing the project$extra"
  $VPY -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  $VPY -m pip install -q -e ".$extra"
  echo "$want" > "$stamp"
fi
