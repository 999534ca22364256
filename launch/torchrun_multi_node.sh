#!/usr/bin/env bash
# `bam pretrain` over several machines with torchrun: run this same command on every node, with
# its own NODE_RANK (0 .. NNODES-1). Node 0 hosts the rendezvous at MASTER_ADDR:MASTER_PORT.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0.cluster MASTER_PORT=29500 \
#       launch/torchrun_multi_node.sh --config configs/pretrain/vit_small_patch16.yaml
#
# Environment: NNODES, NODE_RANK, MASTER_ADDR (required); MASTER_PORT (29500); GPUS_PER_NODE
# (default: every GPU nvidia-smi lists; without GPUs set it, with --trainer.accelerator cpu);
# BAM_PROGRAM (default "-m bam pretrain").
# All nodes must see the same run directory (shared file system): rank 0 writes the checkpoints
# and every rank reads last.ckpt when the same command is run again.
set -euo pipefail
# The process layout follows the options ("$@"): it is this launch's, whatever a recipe says.

: "${NNODES:?set NNODES, the number of machines}"
: "${NODE_RANK:?set NODE_RANK, the index of this machine, 0 on the machine at MASTER_ADDR}"
: "${MASTER_ADDR:?set MASTER_ADDR, the address of node 0}"
MASTER_PORT=${MASTER_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi --list-gpus 2>/dev/null | wc -l)}
if [ "$GPUS_PER_NODE" -lt 1 ]; then
  echo "$0: no GPU found by nvidia-smi: set GPUS_PER_NODE=<processes> (and pass --trainer.accelerator cpu to run on CPU)" >&2
  exit 2
fi
read -r -a PROGRAM <<< "${BAM_PROGRAM:--m bam pretrain}"

exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    "${PROGRAM[@]}" "$@" --trainer.num_nodes "$NNODES" --trainer.devices "$GPUS_PER_NODE" --trainer.strategy ddp \
    --ckpt_path last
