#!/usr/bin/env bash
# Creates ./.venv-torch: a CPU build of torch 2.13.0 with numpy and safetensors, for the tests that
# compare checkpoint interop against a PyTorch CLIP (tests/test_interop.py skips them without it).
# `bash launch/venv.sh test` runs it.
#
#   bash launch/torch_env.sh [--dir DIR] [--python PATH]
#
# torch comes from PyTorch's CPU wheel index (https://download.pytorch.org/whl/cpu, or
# $XCLIP_TORCH_INDEX) where that is reachable; otherwise from pip's own sources (PyPI,
# $PIP_FIND_LINKS, ...) only if what they offer is a CPU build (no nvidia-* dependencies). A CUDA
# build (several GB) is never installed: the script says so, creates nothing, and exits 0.
# Python: --python PATH, $TORCH_PYTHON, python3.11 (its CPU wheel is the one on many mirrors),
# or python3.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }

TORCH="torch==2.13.0"
index="${XCLIP_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
dir=.venv-torch python="${TORCH_PYTHON:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dir) dir="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done

if "$dir/bin/python" -c "import torch, numpy, safetensors" >/dev/null 2>&1; then
  echo "$dir already has torch $("$dir/bin/python" -c 'import torch; print(torch.__version__)')."
  exit 0
fi
if [ -z "$python" ]; then
  for candidate in python3.11 python3; do
    if "$candidate" -c "" >/dev/null 2>&1; then python="$candidate"; break; fi
  done
fi
[ -n "$python" ] || { echo "torch: no python3.11 or python3 found; pass --python." >&2; exit 1; }

skip() {
  echo "torch: $*" >&2
  echo "torch: $dir not created; the PyTorch parity tests (tests/test_interop.py) will skip. To" \
       "run them, make a CPU wheel of $TORCH reachable (e.g. pip download it from $index on a" \
       "connected machine and point PIP_FIND_LINKS at it), then run bash launch/torch_env.sh." >&2
  rm -rf "$dir"
  exit 0
}

echo "Creating $dir with $python ($("$python" --version 2>&1))."
rm -rf "$dir"
"$python" -m venv "$dir"
pip=("$dir/bin/python" -m pip)

if "$dir/bin/python" - "$index" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=15)
EOF
then
  echo "Installing $TORCH (CPU build) from $index, then numpy and safetensors."
  "${pip[@]}" install --index-url "$index" "$TORCH"
else
  echo "PyTorch's CPU wheel index ($index) is not reachable: asking pip's own sources."
  report="$(mktemp)"
  if ! "${pip[@]}" install --dry-run --ignore-installed --quiet --report "$report" "$TORCH" \
      >/dev/null 2>&1; then
    rm -f "$report"
    skip "neither $index nor pip's sources offer $TORCH."
  fi
  # The resolved set, without installing anything: a CUDA build pulls nvidia-* packages.
  resolved="$("$dir/bin/python" - "$report" <<'EOF'
import json, sys
items = json.load(open(sys.argv[1]))["install"]
print("\n".join(f"{i['metadata']['name']}=={i['metadata']['version']}" for i in items))
EOF
)"
  rm -f "$report"
  cuda="$(grep -i '^nvidia[-_]' <<<"$resolved" || true)"
  if [ -n "$cuda" ]; then
    needs="$(tr '\n' ' ' <<<"$cuda" | cut -c1-120)"
    skip "pip's sources offer $TORCH only as a CUDA build (it needs $needs..., several GB)," \
         "which is never installed here."
  fi
  torch_version="$(grep -i '^torch==' <<<"$resolved" || true)"
  echo "Installing ${torch_version:-$TORCH} (a CPU build: no nvidia packages) from pip's sources."
  "${pip[@]}" install "$TORCH"
fi
"${pip[@]}" install numpy safetensors
if "${pip[@]}" list 2>/dev/null | grep -qi '^nvidia[-_]'; then
  skip "the installed torch pulled nvidia packages (a CUDA build); removing it."
fi
echo "$dir: torch $("$dir/bin/python" -c 'import torch; print(torch.__version__)') ready."
