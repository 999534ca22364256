#!/usr/bin/env bash
# The GPU paths, on the GPUs of this machine, in one short run (a few minutes on one GPU):
#   1. every recipe in configs/pretrain/ for a few steps through `bam pretrain` (one GPU: one
#      process; two or more: DDP over NCCL, Lightning's launcher), in bf16 and fp16, with the
#      batched on-device augmentation;
#   2. the FFCV loader: `bam data ffcv` of a generated folder, then a pretraining run reading it;
#   3. the multi-process launch tests with the GPU accelerator (BAM_TEST_ACCELERATOR=gpu);
#   4. images/s of a full BAM step next to a backbone-only step (tests/gpu/throughput.py).
#
#   bash tests/gpu/check.sh            (after bash scripts/install.sh with a CUDA build of torch)
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
BAM=${BAM:-.venv/bin/bam}
GPUS=$(nvidia-smi --list-gpus | wc -l)
[ "$GPUS" -ge 1 ] || { echo "no GPU found by nvidia-smi" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failures=0

"$PYTHON" - "$work/images" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "tests/helpers")
from product_runs import write_image_folder
write_image_folder(Path(sys.argv[1]))
EOF

shrunk_args() {  # the launch tests' shrunk recipe, as shell words
  "$PYTHON" - "$@" <<'EOF'
import shlex, sys
from pathlib import Path
sys.path.insert(0, "tests/helpers")
from product_runs import shrunk_recipe_args
print(shlex.join(shrunk_recipe_args(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))))
EOF
}

layout=(--trainer.accelerator gpu --trainer.devices "$GPUS")
[ "$GPUS" -ge 2 ] && layout+=(--trainer.strategy ddp)

check() {  # name, command...
  local name=$1; shift
  local start=$SECONDS
  if "$@" >"$work/$name.log" 2>&1; then
    printf '%-40s ok      %4ds\n' "$name" $((SECONDS - start))
  else
    printf '%-40s FAILED  %4ds (last lines below)\n' "$name" $((SECONDS - start))
    tail -15 "$work/$name.log"
    failures=$((failures + 1))
  fi
}

echo "== 1. every recipe on $GPUS GPU(s), bf16 and fp16, on-device augmentation"
for config in configs/pretrain/*.yaml; do
  for precision in bf16-mixed 16-mixed; do
    name="$(basename "$config" .yaml)-$precision"
    read -r -a args <<< "$(shrunk_args "$config" "$work/images" "$work/runs/$name")"
    check "$name" "$BAM" pretrain "${args[@]}" "${layout[@]}" --trainer.precision "$precision" \
      --data.init_args.augment_on device
  done
done

echo "== 2. FFCV loader"
check ffcv-write "$BAM" data ffcv --source "$work/images/train" --output "$work/train.beton"
check ffcv-write-val "$BAM" data ffcv --source "$work/images/val" --output "$work/val.beton"
read -r -a args <<< "$(shrunk_args configs/pretrain/vit_small_patch16.yaml "$work/images" "$work/runs/ffcv")"
check ffcv-pretrain "$BAM" pretrain "${args[@]}" "${layout[@]}" --data bam.data.FFCVDataModule \
  --data.init_args.path "$work/train.beton" --data.init_args.val_path "$work/val.beton" \
  --data.init_args.base_size 40 --data.init_args.eval_size 32 --data.init_args.augment_on device

echo "== 3. launch tests with the GPU accelerator (2 processes: needs 2 GPUs)"
[ "$GPUS" -ge 2 ] && check launch-tests env BAM_TEST_ACCELERATOR=gpu "$PYTHON" -m pytest -q -x tests/launch/test_launch_pretrain.py \
  -k "demo-lightning or vit_small_patch16-torchrun"

echo "== 4. throughput (one GPU, batch 64 per step)"
for precision in bf16 fp16; do
  "$PYTHON" tests/gpu/throughput.py --precision "$precision" --batch 64 \
    --config configs/pretrain/vit_small_patch16.yaml --config configs/pretrain/resnet50.yaml \
    --config configs/pretrain/demo.yaml || failures=$((failures + 1))
done

echo "== $failures failure(s)"
[ "$failures" -eq 0 ]
