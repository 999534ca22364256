#!/usr/bin/env bash
# Set up everything bam needs on a fresh Debian/Ubuntu machine, idempotently:
# system libraries (for the optional FFCV loader) and SLURM with munge (the test suite submits
# launch/slurm_pretrain.sbatch to a one-node cluster on localhost), then a virtual environment at ./.venv with
# bam installed in editable mode with its test and ffcv extras (FFCV builds from source against
# those libraries). The environment is cached under
# ~/.cache/bam keyed by a hash of setup.cfg, so re-running after a fresh clone is quick.
set -euo pipefail
cd "$(dirname "$0")/.."

system_packages=(libturbojpeg0-dev libopencv-dev pkg-config slurm-wlm munge)
if ! dpkg -s "${system_packages[@]}" >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${system_packages[@]}" >/dev/null
fi

key=$(cat setup.cfg scripts/install.sh | sha1sum | cut -c1-12)
cached="${BAM_CACHE:-$HOME/.cache/bam}/venv-$key"
if [ ! -x "$cached/bin/bam" ] || [ ! -f "$cached/.complete" ]; then
  rm -rf "$cached"
  python3 -m venv "$cached"
  "$cached/bin/pip" install -q --upgrade pip "setuptools>=64" wheel
  "$cached/bin/pip" install -q "torch==2.14.1" "torchvision==0.29.1"
  "$cached/bin/pip" install -q -e ".[test,ffcv]"
  # the test suite fails (instead of skipping) FFCV tests in an environment marked so
  touch "$cached/bam-expects-ffcv"
  touch "$cached/.complete"
fi
# The cached environment may have been made from another clone: point it at this one.
"$cached/bin/pip" install -q --no-deps --no-build-isolation -e . >/dev/null
ln -sfn "$cached" .venv
# a broken FFCV build (missing libturbojpeg, numba mismatch) stops the install here, not later in a loader
"$cached/bin/python" -c "import ffcv" || { echo "FFCV was installed but does not import (see above)" >&2; exit 1; }
echo "bam environment ready: $(pwd)/.venv"
