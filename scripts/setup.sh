#!/usr/bin/env bash
# One-time set-up, safe to repeat: redis-server, a virtual environment, torch, and the project.
#
#   ARRL_VENV      where the virtual environment goes (default: .venv in the project)
#   ARRL_TORCH     the torch requirement installed first (default: torch==2.13.0)
#   PYTHON         the interpreter that creates the venv (default: python3; needs 3.11+)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ARRL_VENV:-.venv}
TORCH=${ARRL_TORCH:-torch==2.13.0}
PYTHON=${PYTHON:-python3}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_install() {
  echo "setup: installing $* with apt-get" >&2
  as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

command -v redis-server >/dev/null || apt_install redis-server
command -v git >/dev/null || apt_install git  # the lineage of kept edits is a git repository
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "arrl needs Python 3.11 or newer"'
if [ ! -x "$VENV/bin/pip" ]; then
  # Debian's Python leaves a venv without pip when python3-venv is missing: start over then.
  rm -rf "$VENV"
  if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
    rm -rf "$VENV"
    pyver=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    apt_install python3-venv || true
    "$PYTHON" -m venv "$VENV" 2>/dev/null || { rm -rf "$VENV"; apt_install "python$pyver-venv"; "$PYTHON" -m venv "$VENV"; }
  fi
fi
PY="$VENV/bin/python"

if ! "$PY" -c 'import torch' 2>/dev/null; then
  # Torch goes in first and explicitly: a bare `torch` resolved by pip on a machine without a
  # GPU would pull a CUDA build of several GB. Order: a wheel already on local disk (pip's
  # find-links), then PyTorch's CPU index when no NVIDIA GPU is present, then PyPI.
  if "$PY" -m pip download -q --no-deps --no-index -d "$(mktemp -d)" "$TORCH" >/dev/null 2>&1; then
    "$PY" -m pip install -q "$TORCH"
  elif ! command -v nvidia-smi >/dev/null && \
       "$PY" -m pip install -q --timeout 20 --retries 1 "$TORCH" --index-url https://download.pytorch.org/whl/cpu; then
    :
  else
    "$PY" -m pip install -q "$TORCH"
  fi
fi
"$PY" -m pip install -q -e '.[dev,search]'
echo "setup: ready ($("$PY" -c 'import torch, sys; print(f"python {sys.version.split()[0]}, torch {torch.__version__}")'))" >&2
