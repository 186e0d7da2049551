#!/usr/bin/env bash
# Distil TEACHER into a PRESET student with DeepSpeed, the frozen teacher co-hosted beside it.
#   TEACHER=runs/sft/final DATA=data/catalogs PRESET=balanced NUM_GPUS=4 bash scripts/run_distill.sh [flags]
#   multi-node: TEACHER=... PRESET=balanced HOSTFILE=scripts/hostfile.example NUM_NODES=2 bash scripts/run_distill.sh
#   resume after a crash or pre-emption: bash scripts/run_distill.sh --resume
# Variables, each a train_ds.py flag passed only when set (config.py's default otherwise; train_ds.py --help):
#   CONFIG (--config, a JSON/YAML recipe), TEACHER, DATA, PRESET, OUT (default runs/distill-PRESET),
#   DS_CONFIG, TEACHER_DS_CONFIG (--train.teacher_ds_config), MICRO_BATCH, GRAD_ACCUM, LR, EPOCHS, KD_LOSS.
# The launcher's (NUM_GPUS, HOSTFILE, NUM_NODES, MASTER_ADDR, MASTER_PORT, LAUNCHER_ARGS, DEEPSPEED, DRY_RUN=1) are
# described in scripts/deepspeed_launch.sh. Flags after the script go to train_ds.py and win over the variables.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/distill${PRESET:+-$PRESET}}
source scripts/deepspeed_launch.sh
flags_from_variables CONFIG=--config TEACHER=--teacher DATA=--data PRESET=--preset OUT=--out DS_CONFIG=--ds_config \
  TEACHER_DS_CONFIG=--train.teacher_ds_config MICRO_BATCH=--micro_batch_size GRAD_ACCUM=--grad_accum LR=--lr \
  EPOCHS=--epochs KD_LOSS=--kd_loss
deepspeed_launch run_distill --stage distill "${FLAGS[@]}" "$@"
