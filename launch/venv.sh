#!/usr/bin/env bash
# Creates (or refreshes) the project's Python 3.12 virtual environment in ./.venv.
#
#   bash launch/venv.sh          # runtime dependencies
#   bash launch/venv.sh test     # + test dependencies (pytest, chex)
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
