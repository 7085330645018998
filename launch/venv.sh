#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in ./.venv.
#
#   bash launch/venv.sh [--python PATH] [--dry-run] [test|cuda|tpu]
#
#   (no extra)  runtime dependencies (jax, flax, optax, orbax, TensorFlow for the data, ...)
#   test        + test dependencies (pytest, chex, shellcheck) and .venv-torch (launch/torch_env.sh)
#   cuda, tpu   + the accelerator build of jaxlib
#
# The interpreter: --python PATH (or $PYTHON); else the first Python >= 3.12 among python3.12,
# python3.13, python3.14, python3 on PATH and pyenv's versions (JAX >= 0.11 needs 3.12).
# Installs the package in editable mode; re-running is cheap: pip is skipped while setup.py and
# the requested extra are unchanged. --dry-run says what would be done and changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }

python="${PYTHON:-}" dry_run=0 extra=""
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --python) python="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    test|cuda|tpu) extra="$1"; shift ;;
    *) echo "usage: $0 [--python PATH] [--dry-run] [test|cuda|tpu]" >&2; exit 2 ;;
  esac
done

# "3.12" for an interpreter that runs, nothing otherwise (pyenv shims of absent versions fail).
version_of() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true; }
supported() { case "$1" in 3.1[2-9]|3.[2-9][0-9]) return 0 ;; *) return 1 ;; esac; }

find_python() {
  local candidate root version
  for candidate in python3.12 python3.13 python3.14 python3; do
    command -v "$candidate" >/dev/null 2>&1 || continue
    version="$(version_of "$candidate")"
    if supported "$version"; then command -v "$candidate"; return; fi
  done
  root="$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"
  for candidate in "$root"/versions/3.1[2-9]*/bin/python3; do
    [ -x "$candidate" ] && supported "$(version_of "$candidate")" && { echo "$candidate"; return; }
  done
  return 1
}

# In a dry run every action is announced as what would happen.
say() { if [ "$dry_run" = 1 ]; then echo "[dry run] $*"; else echo "$*"; fi; }

if [ -x .venv/bin/python ]; then
  say "Using the existing .venv (Python $(version_of .venv/bin/python))${python:+; $python is" \
      "not used: delete .venv to change the interpreter}."
  python=.venv/bin/python
else
  if [ -z "$python" ]; then
    python="$(find_python)" || {
      echo "No Python >= 3.12 found (tried python3.12, python3.13, python3.14, python3 and" \
           "pyenv's versions): install one, or pass --python PATH (JAX >= 0.11 needs 3.12)." >&2
      exit 1; }
  fi
  version="$(version_of "$python")"
  if ! supported "$version"; then
    echo "$python is Python ${version:-?(does not run)}: xclip_jax needs Python >= 3.12" \
         "(JAX >= 0.11). Pass --python PATH to a newer one." >&2
    exit 1
  fi
  say "Creating .venv with Python $version ($python)."
  if [ "$dry_run" = 0 ]; then
    "$python" -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
  fi
fi

stamp=".venv/.xclip_jax-installed"
want="$(sha256sum setup.py | cut -c1-16)-${extra:-base}"
if [ -f "$stamp" ] && grep -qx -- "$want" "$stamp"; then
  say "xclip_jax${extra:+[$extra]} is installed and setup.py is unchanged: nothing to install."
else
  spec="."
  [ -n "$extra" ] && spec=".[$extra]"
  say "Installing xclip_jax${extra:+[$extra]} (editable) and its dependencies: jax, flax," \
       "optax, orbax-checkpoint, TensorFlow (CPU) and TFDS for the data, ... About 2.5 GB and a" \
       "few minutes on a first install."
  if [ "$dry_run" = 0 ]; then
    .venv/bin/python -m pip install -e "$spec"
    echo "$want" >> "$stamp"
  fi
fi

# The checkpoint-interop tests compare against a PyTorch CLIP in a separate .venv-torch with a
# CPU build of torch; without it they skip. Its failure warns and does not stop.
if [ "$extra" = "test" ]; then
  if [ "$dry_run" = 1 ]; then
    say "Setting up .venv-torch: bash launch/torch_env.sh (a CPU torch, or a message why not)."
  else
    bash launch/torch_env.sh || echo "warning: launch/torch_env.sh failed; the PyTorch parity" \
                                     "tests will skip." >&2
  fi
fi
