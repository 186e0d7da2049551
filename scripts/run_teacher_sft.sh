#!/usr/bin/env bash
# Fine-tune the teacher (a Qwen folder) on the parallel corpus with DeepSpeed ZeRO-3; the result is a folder
# that run_distill.sh takes as TEACHER.
#   TEACHER=/models/Qwen1.5-1.8B DATA=data/catalogs NUM_GPUS=4 bash scripts/run_teacher_sft.sh [train_ds.py flags]
#   multi-node: HOSTFILE=scripts/hostfile.example NUM_NODES=2 bash scripts/run_teacher_sft.sh
set -euo pipefail
cd "$(dirname "$0")/.."
TEACHER=${TEACHER:-models/tiny-qwen}
DATA=${DATA:-data/catalogs}
OUT=${OUT:-runs/sft}
NUM_GPUS=${NUM_GPUS:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}
[ "$NUM_GPUS" -gt 0 ] || NUM_GPUS=2
DS_CONFIG=${DS_CONFIG:-ds_configs/zero3.json}
MICRO_BATCH=${MICRO_BATCH:-8}
GRAD_ACCUM=${GRAD_ACCUM:-4}
LR=${LR:-2e-5}
EPOCHS=${EPOCHS:-1}
NODES=()
if [ -n "${HOSTFILE:-}" ]; then NODES=(--hostfile "$HOSTFILE" --num_nodes "${NUM_NODES:-1}"); fi
cmd=(deepspeed "${NODES[@]}" --num_gpus "$NUM_GPUS" train_ds.py --stage sft --teacher "$TEACHER" --data "$DATA"
     --out "$OUT" --ds_config "$DS_CONFIG" --micro_batch_size "$MICRO_BATCH" --grad_accum "$GRAD_ACCUM"
     --lr "$LR" --epochs "$EPOCHS" "$@")
echo "run_teacher_sft: ${cmd[*]}"
exec "${cmd[@]}"
