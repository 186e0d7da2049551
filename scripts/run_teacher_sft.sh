#!/usr/bin/env bash
# Fine-tune the teacher (a Qwen folder) on the parallel corpus with DeepSpeed ZeRO-3; the result is a folder
# that run_distill.sh takes as TEACHER.
#   TEACHER=/models/Qwen1.5-1.8B DATA=data/catalogs NUM_GPUS=4 bash scripts/run_teacher_sft.sh [train_ds.py flags]
#   multi-node: HOSTFILE=scripts/hostfile.example NUM_NODES=2 bash scripts/run_teacher_sft.sh
# Variables, each a train_ds.py flag passed only when set (config.py's default otherwise; train_ds.py --help):
#   CONFIG (--config; default scripts/recipes/qwen-sft.yaml: a real Qwen's rate and batch), TEACHER, DATA,
#   OUT (default runs/sft), DS_CONFIG, MICRO_BATCH, GRAD_ACCUM, LR, EPOCHS.
# The launcher's (NUM_GPUS, HOSTFILE, NUM_NODES, MASTER_ADDR, MASTER_PORT, LAUNCHER_ARGS, DEEPSPEED, DRY_RUN=1) are
# described in scripts/deepspeed_launch.sh. Flags after the script go to train_ds.py and win over the variables.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-scripts/recipes/qwen-sft.yaml}
OUT=${OUT:-runs/sft}
source scripts/deepspeed_launch.sh
flags_from_variables CONFIG=--config TEACHER=--teacher DATA=--data OUT=--out DS_CONFIG=--ds_config \
  MICRO_BATCH=--micro_batch_size GRAD_ACCUM=--grad_accum LR=--lr EPOCHS=--epochs
deepspeed_launch run_teacher_sft --stage sft "${FLAGS[@]}" "$@"
