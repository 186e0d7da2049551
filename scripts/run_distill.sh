#!/usr/bin/env bash
# Distil TEACHER into a PRESET student with DeepSpeed ZeRO-3, teacher co-hosted and sharded.
#   TEACHER=runs/sft/final DATA=data/catalogs PRESET=balanced NUM_GPUS=4 bash scripts/run_distill.sh [flags]
#   multi-node: HOSTFILE=scripts/hostfile.example NUM_NODES=2 bash scripts/run_distill.sh
#   resume after a crash or pre-emption: bash scripts/run_distill.sh --resume
# Variables: TEACHER, DATA, PRESET, OUT, DS_CONFIG, TEACHER_DS_CONFIG, MICRO_BATCH, GRAD_ACCUM, LR, EPOCHS,
# KD_LOSS below; the launcher's (NUM_GPUS, HOSTFILE, NUM_NODES, MASTER_ADDR, MASTER_PORT, LAUNCHER_ARGS, DEEPSPEED,
# DRY_RUN=1) are described in scripts/deepspeed_launch.sh. Flags after the script go to train_ds.py and win over
# the variables.
set -euo pipefail
cd "$(dirname "$0")/.."
TEACHER=${TEACHER:-runs/sft/final}
DATA=${DATA:-data/catalogs}
PRESET=${PRESET:-balanced}
OUT=${OUT:-runs/distill-$PRESET}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero3.json}
TEACHER_DS_CONFIG=${TEACHER_DS_CONFIG:-ds_configs/teacher_zero3.json}
MICRO_BATCH=${MICRO_BATCH:-32}
GRAD_ACCUM=${GRAD_ACCUM:-1}
LR=${LR:-1e-3}
EPOCHS=${EPOCHS:-10}
KD_LOSS=${KD_LOSS:-forward_kl}
source scripts/deepspeed_launch.sh
deepspeed_launch run_distill --stage distill --teacher "$TEACHER" --data "$DATA" --preset "$PRESET" --out "$OUT" \
  --ds_config "$DS_CONFIG" --train.teacher_ds_config "$TEACHER_DS_CONFIG" --micro_batch_size "$MICRO_BATCH" \
  --grad_accum "$GRAD_ACCUM" --lr "$LR" --epochs "$EPOCHS" --kd_loss "$KD_LOSS" "$@"
