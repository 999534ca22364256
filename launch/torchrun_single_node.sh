#!/usr/bin/env bash
# `bam pretrain` on every GPU of this machine, started by torchrun (one process per GPU).
#
#   launch/torchrun_single_node.sh --config configs/pretrain/vit_small_patch16.yaml [more bam pretrain options]
#
# Environment: GPUS, the number of processes (default: every GPU nvidia-smi lists; on a machine
# without GPUs set it, with --trainer.accelerator cpu), BAM_PROGRAM (default "-m bam pretrain").
# Re-running the same command after an interruption resumes from <run dir>/checkpoints/last.ckpt.
set -euo pipefail
# The process layout follows the options ("$@"): it is this launch's, whatever a recipe says.

GPUS=${GPUS:-$(nvidia-smi --list-gpus 2>/dev/null | wc -l)}
if [ "$GPUS" -lt 1 ]; then
  echo "$0: no GPU found by nvidia-smi: set GPUS=<processes> (and pass --trainer.accelerator cpu to run on CPU)" >&2
  exit 2
fi
read -r -a PROGRAM <<< "${BAM_PROGRAM:--m bam pretrain}"

# --standalone: a local rendezvous on a free port; Lightning reads the process layout from torchrun.
exec torchrun --standalone --nnodes 1 --nproc-per-node "$GPUS" \
    "${PROGRAM[@]}" "$@" --trainer.num_nodes 1 --trainer.devices "$GPUS" --trainer.strategy ddp \
    --ckpt_path last
