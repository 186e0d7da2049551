#!/usr/bin/env bash
# Fine-tune the teacher (a Qwen folder) on the parallel corpus with DeepSpeed ZeRO-3; the result is a folder
# that run_distill.sh takes as TEACHER.
#   TEACHER=/models/Qwen1.5-1.8B DATA=data/catalogs NUM_GPUS=4 bash scripts/run_teacher_sft.sh [train_ds.py flags]
#   multi-node: HOSTFILE=scripts/hostfile.example NUM_NODES=2 bash scripts/run_teacher_sft.sh
# Variables: TEACHER, DATA, OUT, DS_CONFIG, MICRO_BATCH, GRAD_ACCUM, LR, EPOCHS below; the launcher's
# (NUM_GPUS, HOSTFILE, NUM_NODES, MASTER_ADDR, MASTER_PORT, LAUNCHER_ARGS, DEEPSPEED, DRY_RUN=1) are described in
# scripts/deepspeed_launch.sh. Flags after the script go to train_ds.py and win over the variables.
set -euo pipefail
cd "$(dirname "$0")/.."
TEACHER=${TEACHER:-models/tiny-qwen}
DATA=${DATA:-data/catalogs}
OUT=${OUT:-runs/sft}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero3.json}
MICRO_BATCH=${MICRO_BATCH:-8}
GRAD_ACCUM=${GRAD_ACCUM:-4}
LR=${LR:-2e-5}
EPOCHS=${EPOCHS:-1}
source scripts/deepspeed_launch.sh
deepspeed_launch run_teacher_sft --stage sft --teacher "$TEACHER" --data "$DATA" --out "$OUT" \
  --ds_config "$DS_CONFIG" --micro_batch_size "$MICRO_BATCH" --grad_accum "$GRAD_ACCUM" --lr "$LR" \
  --epochs "$EPOCHS" "$@"
