#!/usr/bin/env bash
# Create (or update) the virtual environment the Makefile targets run in:
#
#   scripts/setup-venv.sh [train|test|all]
#
#   train  torch + unigendet with the model and eval extras (what `python -m unigendet.train` needs)
#   test   the `all` extra: also Triton and the test tools (what `python -m pytest tests` needs)
#   all    the same as test
#
# torch: on a machine where `nvidia-smi` lists a GPU, PyPI's default (CUDA) build, and the `gpu` extra (DALI)
# on top; otherwise the CPU build, from PyTorch's CPU index when it is reachable (PyPI's Linux wheels are CUDA
# builds of several GB), else from the configured package indexes.
#
# Environment: PYTHON (python3), VENV (.venv), TORCH_SPEC (torch==2.13.0), TORCH_INDEX_URL (an index to take
# torch from), UNIGENDET_EXTRAS (the extras to install instead of the choice above, e.g. "all,dali").
# Nothing is installed again when the environment already holds what is asked for.
set -euo pipefail
cd "$(dirname "$0")/.."

purpose="${1:-train}"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
CPU_INDEX="https://download.pytorch.org/whl/cpu"
say() { echo "setup-venv: $*" >&2; }

case "$purpose" in
  train) extras="model,eval" ;;
  test | all) extras="all" ;;
  *) say "unknown purpose '$purpose' (train, test or all)"; exit 2 ;;
esac

if command -v nvidia-smi > /dev/null 2>&1 && nvidia-smi -L 2> /dev/null | grep -q "^GPU"; then
  device=cuda
  extras="$extras,gpu"
else
  device=cpu
fi
extras="${UNIGENDET_EXTRAS:-$extras}"

if ! command -v "$PYTHON" > /dev/null 2>&1; then
  say "$PYTHON not found: install Python 3.10 or newer (or set PYTHON=/path/to/python3)"
  exit 2
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  say "$("$PYTHON" --version 2>&1) is too old: unigendet needs Python 3.10 or newer (set PYTHON=...)"
  exit 2
fi

# The stamp records the torch choice (first line) and the extras installed so far (second line); a request is
# met when the first line matches and every extra it needs is already installed.
expand() {  # extras -> the leaf extras they install, one per line
  tr ',' '\n' <<< "$1" | while read -r e; do
    case "$e" in
      all) printf '%s\n' model eval triton test ;;
      gpu) printf '%s\n' triton dali ;;
      "") ;;
      *) echo "$e" ;;
    esac
  done | sort -u
}
stamp="$VENV/.unigendet-setup"
base="device=$device torch=$TORCH_SPEC index=${TORCH_INDEX_URL:-} setup=$(cksum < setup.py)"
have=""
if [ -f "$stamp" ] && [ -x "$VENV/bin/python" ] && [ "$(sed -n 1p "$stamp")" = "$base" ]; then
  have="$(sed -n 2p "$stamp")"
  if [ -z "$(comm -23 <(expand "$extras") <(expand "$have"))" ]; then
    exit 0
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  if ! "$PYTHON" -m venv "$VENV"; then
    say "'$PYTHON -m venv' failed; on Debian/Ubuntu install the venv module first: apt install python3-venv"
    rm -rf "$VENV"
    exit 2
  fi
fi
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q -U pip "setuptools>=70" wheel ninja

torch_index="${TORCH_INDEX_URL:-}"
probe="import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=5)"
if [ -z "$torch_index" ] && [ "$device" = cpu ] && "$VENV/bin/python" -c "$probe" "$CPU_INDEX" 2> /dev/null; then
  torch_index="$CPU_INDEX"
fi
if [ -n "$torch_index" ]; then
  say "installing $TORCH_SPEC ($device build, from $torch_index)"
  pip install -q "$TORCH_SPEC" numpy --index-url "$torch_index"
else
  say "installing $TORCH_SPEC ($device build)"
  pip install -q "$TORCH_SPEC" numpy
fi
if [ "$device" = cpu ] && [ -n "$("$VENV/bin/python" -c 'import torch; print(torch.version.cuda or "")')" ]; then
  say "warning: this is a CUDA build of torch on a machine without a GPU ($CPU_INDEX was not reachable);"
  say "         set TORCH_INDEX_URL to an index of CPU builds to get a smaller one"
fi

extras="$(expand "$extras,$have" | paste -sd, -)"  # keep what an earlier call installed
say "installing unigendet[$extras]"
if command -v c++ > /dev/null 2>&1 || command -v g++ > /dev/null 2>&1; then
  pip install -q -e ".[$extras]" --no-build-isolation  # compiles the C++ kernels against this torch
else
  say "no C++ compiler found: installing without the compiled kernels (the ops fall back to PyTorch)"
  pip install -q -e ".[$extras]"
fi
printf '%s\n%s\n' "$base" "$(expand "$extras,$have" | paste -sd, -)" > "$stamp"
say "ready: $VENV (activate it with '. $VENV/bin/activate')"
