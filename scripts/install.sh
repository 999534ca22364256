#!/usr/bin/env bash
# Set up everything bam needs on a fresh Debian/Ubuntu machine, idempotently:
# system libraries (for the optional FFCV loader) and SLURM with munge (the test suite submits
# launch/slurm_pretrain.sbatch to a one-node cluster on localhost), then a virtual environment at
# ./.venv of THIS checkout with bam installed in editable mode from it, with its test and ffcv
# extras (FFCV builds from source against those libraries).
#
# One environment per checkout: an environment shared by several clones would run whichever
# clone installed into it last. What is shared is pip's cache of downloads and built wheels
# (~/.cache/pip, or PIP_CACHE_DIR), so a second clone installs without downloading or rebuilding
# FFCV. Re-running in a set-up checkout only checks: .venv/.bam-installed records the hash of
# setup.cfg and this script it was installed for; when they change, pip brings .venv up to date.
set -euo pipefail
cd "$(dirname "$0")/.."
checkout=$(pwd -P)

system_packages=(libturbojpeg0-dev libopencv-dev pkg-config slurm-wlm munge)
if ! dpkg -s "${system_packages[@]}" >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${system_packages[@]}" >/dev/null
fi

# earlier versions linked .venv to an environment cached for all clones: this checkout gets its own
if [ -L .venv ]; then rm .venv; fi
stamp=.venv/.bam-installed
key=$(cat setup.cfg scripts/install.sh | sha1sum | cut -c1-12)
if [ ! -x .venv/bin/python ]; then
  rm -rf .venv  # an interrupted creation
  python3 -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$key" ] || [ ! -x .venv/bin/bam ]; then
  rm -f "$stamp"
  .venv/bin/pip install -q --upgrade pip "setuptools>=64" wheel
  .venv/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1"
  .venv/bin/pip install -q -e ".[test,ffcv]"
  # the test suite fails (instead of skipping) FFCV tests in an environment marked so
  touch .venv/bam-expects-ffcv
  echo "$key" > "$stamp"
fi

# the environment must run this checkout's code (-I: not the current directory's, as a user's
# `.venv/bin/bam` started elsewhere would not see it)
origin=$(.venv/bin/python -I -c "import importlib.util; print(importlib.util.find_spec('bam').origin)")
if [ "$(realpath -m "$(dirname "$origin")/..")" != "$checkout" ]; then
  echo "$checkout/.venv imports bam from $origin, not from this checkout: delete .venv and run $checkout/scripts/install.sh again" >&2
  exit 1
fi
# a broken FFCV build (missing libturbojpeg, numba mismatch) stops the install here, not later in a loader
.venv/bin/python -c "import ffcv" || { echo "FFCV was installed but does not import (see above)" >&2; exit 1; }
echo "bam environment ready: $checkout/.venv"
