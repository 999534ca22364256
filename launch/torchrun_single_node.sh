#!/usr/bin/env bash
# `bam pretrain` on every GPU of this machine, started by torchrun (one process per GPU).
#
#   launch/torchrun_single_node.sh --config configs/pretrain/vit_small.yaml [more bam pretrain options]
#
# Environment: GPUS (default: every GPU nvidia-smi lists), BAM_PROGRAM (default "-m bam pretrain").
# Re-running the same command after an interruption resumes from <run dir>/checkpoints/last.ckpt.
set -euo pipefail

GPUS=${GPUS:-$(nvidia-smi --list-gpus | wc -l)}
read -r -a PROGRAM <<< "${BAM_PROGRAM:--m bam pretrain}"

# --standalone: a local rendezvous on a free port; Lightning reads the process layout from torchrun.
exec torchrun --standalone --nnodes 1 --nproc-per-node "$GPUS" \
    "${PROGRAM[@]}" --trainer.num_nodes 1 --trainer.devices "$GPUS" --trainer.strategy ddp \
    --ckpt_path last "$@"
