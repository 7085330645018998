#!/usr/bin/env bash
# Creates (or refreshes) the project's Python 3.12 virtual environment in ./.venv.
#
#   bash launch/venv.sh          # runtime dependencies
#   bash launch/venv.sh test     # + test dependencies (pytest, chex), and .venv-torch (below)
#
# Finds python3.12 on PATH, or under pyenv; installs the package in editable mode. Re-running is
# cheap: pip is skipped while setup.py and the requested extra are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

extra="${1:-}"
case "$extra" in ""|test|cuda|tpu) ;; *) echo "usage: $0 [test|cuda|tpu]" >&2; exit 2 ;; esac

find_python() {
  if command -v python3.12 >/dev/null 2>&1 && python3.12 -c "" >/dev/null 2>&1; then
    command -v python3.12; return
  fi
  local root
  root="$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"
  for p in "$root"/versions/3.12*/bin/python3.12; do
    [ -x "$p" ] && { echo "$p"; return; }
  done
  echo "python3.12 not found: install Python 3.12 (JAX >= 0.11 needs it)." >&2
  exit 1
}

if [ ! -x .venv/bin/python ]; then
  "$(find_python)" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi

stamp=".venv/.xclip_jax-installed"
want="$(sha256sum setup.py | cut -c1-16)-${extra:-base}"
if [ ! -f "$stamp" ] || ! grep -qx -- "$want" "$stamp"; then
  spec="."
  [ -n "$extra" ] && spec=".[$extra]"
  .venv/bin/python -m pip install --quiet -e "$spec"
  echo "$want" >> "$stamp"
fi

# Tests of the checkpoint interop compare against a PyTorch CLIP; torch stays out of .venv (its
# Python 3.12 wheels are multi-GB CUDA builds). A CPU torch for Python 3.11 goes into .venv-torch
# where python3.11 exists; without it those tests skip. A failure here warns and does not stop.
if [ "$extra" = "test" ] && command -v python3.11 >/dev/null 2>&1; then
  if ! .venv-torch/bin/python -c "import torch, numpy, safetensors" >/dev/null 2>&1; then
    if ! { python3.11 -m venv .venv-torch \
           && .venv-torch/bin/python -m pip install --quiet torch==2.13.0 numpy safetensors; } \
           >/dev/null 2>&1; then
      echo "warning: could not install torch into .venv-torch; the PyTorch parity tests will skip." >&2
    fi
  fi
fi
