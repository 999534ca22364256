#!/usr/bin/env bash
# The GPU paths, on the GPUs of this machine, in one short run (a few minutes on one GPU):
#   1. every recipe in configs/pretrain/ for a few steps through `bam pretrain` (one GPU: one
#      process; two or more: DDP over NCCL, Lightning's launcher), in bf16 and fp16, with the
#      batched on-device augmentation;
#   2. the FFCV loader: `bam data ffcv` of a generated folder, then a pretraining run reading it;
#   3. images/s of a full BAM step next to a backbone-only step (tests/gpu/throughput.py);
#   4. the multi-process launch tests with the GPU accelerator (BAM_TEST_ACCELERATOR=gpu, 2+ GPUs).
# 1-3 are the pytest tests marked `gpu` in tests/gpu/test_gpu.py (they skip on a machine without CUDA).
#
#   bash tests/gpu/check.sh            (after bash scripts/install.sh with a CUDA build of torch)
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
GPUS=$(nvidia-smi --list-gpus | wc -l)
[ "$GPUS" -ge 1 ] || { echo "no GPU found by nvidia-smi" >&2; exit 2; }
echo "== 1-3. recipes in bf16/fp16, the FFCV loader and the throughput table, on $GPUS GPU(s) (tests/gpu/test_gpu.py)"
status=0
"$PYTHON" -m pytest -p no:cacheprovider -s -v -m gpu tests/gpu || status=1

if [ "$GPUS" -ge 2 ]; then
  echo "== 4. launch tests with the GPU accelerator (2 processes over NCCL)"
  BAM_TEST_ACCELERATOR=gpu "$PYTHON" -m pytest -p no:cacheprovider -q -x tests/launch/test_launch_pretrain.py \
    -k "dino_demo-lightning or vit_small_patch16-torchrun" || status=1
fi
exit $status
