#!/usr/bin/env bash
# Make a checkpoint resumable with another number of ranks: converts RUN/checkpoints/TAG (ZeRO shards, one set per
# rank that saved it) into DeepSpeed's universal format (one file per parameter and optimizer state) in
# RUN/checkpoints/TAG_universal with DeepSpeed's own converter (deepspeed.checkpoint.ds_to_universal), then points
# RUN/checkpoints/latest at it. `train_ds.py --resume` loads a *_universal tag with DeepSpeed's load_universal, on
# any number of ranks; its next checkpoints are ordinary ones again.
#   RUN=runs/distill bash scripts/convert_checkpoint.sh               # the checkpoint `latest` names
#   RUN=runs/distill TAG=step2000 bash scripts/convert_checkpoint.sh  # a given one
#   then, e.g. from 2 GPUs to 4:  deepspeed --num_gpus 4 train_ds.py --stage distill --config runs/distill/config.json --resume
# Variables (all optional):
#   RUN              the run folder (default runs/distill; relative paths are from the repository root)
#   TAG              the checkpoint to convert, a stepN folder of RUN/checkpoints (default: the one `latest` names)
#   EXTRACT_WORKERS  processes reading the ranks' shards (default 4, DeepSpeed's; each holds one rank's shard)
#   MERGE_WORKERS    processes merging them per parameter (default 2, DeepSpeed's)
#   NUM_GPUS         only for the printed next command: the ranks to resume with (default: N)
#   PYTHON           the interpreter with DeepSpeed (default .venv/bin/python, else python3)
#   DRY_RUN=1        print the resolved command and exit without running it
# It prints its resolved command first, as one line `convert_checkpoint: python ...` (shell-quoted). The
# conversion is written under TAG_universal.tmp and renamed when complete; `latest` moves (atomically) only after
# that, so a failed conversion leaves the run as it was. Universal folders hold the full fp32 weights and Adam
# moments (about 12 bytes a parameter) and are not pruned by --keep: delete them once the run has saved again.
# The global batch is micro_batch_size x grad_accum x ranks: to keep it with other ranks, change --grad_accum
# (or --micro_batch_size) when resuming; the learning-rate schedule goes on from the saved step either way.
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=convert_checkpoint.sh

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "$NAME: $*" >&2; exit 1; }

case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  "") ;;
  *) die "unknown argument '$1'; it takes its settings from variables (RUN=... TAG=...), see --help" ;;
esac

RUN=${RUN:-runs/distill}
TAG=${TAG:-}
EXTRACT_WORKERS=${EXTRACT_WORKERS:-4}
MERGE_WORKERS=${MERGE_WORKERS:-2}
NUM_GPUS=${NUM_GPUS:-N}
DRY_RUN=${DRY_RUN:-0}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

# ---- what to convert: clear one-line errors before anything is written
RUN=${RUN%/}
CKPT=$RUN/checkpoints
[ -d "$RUN" ] || die "RUN=$RUN: no such run folder"
[ -d "$CKPT" ] || die "RUN=$RUN: no checkpoints folder ($CKPT); the run has not saved a checkpoint yet"
list_tags() {
  local tags
  tags=$(cd "$CKPT" && ls -d step* 2>/dev/null | grep -v '\.tmp$\|\.partial$' | sort -V | paste -sd ' ') || true
  echo "${tags:-none}"
}
if [ -z "$TAG" ]; then
  [ -f "$CKPT/latest" ] || die "$CKPT/latest not found; name the checkpoint with TAG=stepN (checkpoints: $(list_tags))"
  TAG=$(tr -d '[:space:]' < "$CKPT/latest")
fi
case "$TAG" in
  *_universal) die "TAG=$TAG is already universal: resume it with any number of ranks (train_ds.py --resume $TAG)" ;;
esac
[[ "$TAG" =~ ^step[0-9]+$ ]] || die "TAG=$TAG: give a checkpoint tag such as step200 (checkpoints: $(list_tags))"
SRC=$CKPT/$TAG
[ -d "$SRC" ] || die "TAG=$TAG: no checkpoint $SRC (checkpoints: $(list_tags))"
shards=("$SRC"/*_optim_states.pt)
[ -f "${shards[0]}" ] || die "$SRC has no optimizer shards (*_optim_states.pt): not a DeepSpeed ZeRO checkpoint"
ranks=$(find "$SRC" -maxdepth 1 -name '*zero_pp_rank_*_mp_rank_00_optim_states.pt' | wc -l)

OUT=$CKPT/${TAG}_universal
TMP=$OUT.tmp
# --inject_missing_state: ZeRO-1/2 checkpoints of a plain model carry no universal_checkpoint_info (ZeRO-3 ignores it)
# -W: runpy's "found in sys.modules" warning about `-m` on a module its package imports is harmless here
cmd=("$PYTHON" -W ignore::RuntimeWarning:runpy -m deepspeed.checkpoint.ds_to_universal
     --input_folder "$SRC" --output_folder "$TMP" --num_extract_workers "$EXTRACT_WORKERS" --num_merge_workers "$MERGE_WORKERS" --inject_missing_state)
printf 'convert_checkpoint:'
printf ' %q' "${cmd[@]}"
printf '\n'
if [ "$DRY_RUN" = 1 ]; then exit 0; fi

# ---- convert under a temporary name, then publish: folder first, the pointers last
rm -rf "$TMP"
if ! "${cmd[@]}"; then
  rm -rf "$TMP"
  die "conversion of $SRC failed (see above); nothing changed, $CKPT/latest still names $(cat "$CKPT/latest" 2>/dev/null || echo nothing)"
fi
rm -rf "$OUT"
mv "$TMP" "$OUT"

point() {  # point FILE TAG: write FILE.convert.tmp, flush it to disk, rename it over FILE
  printf '%s' "$2" > "$1.convert.tmp"
  sync "$1.convert.tmp" 2>/dev/null || true
  mv -f "$1.convert.tmp" "$1"
}
point "$CKPT/latest_universal" "${TAG}_universal"  # DeepSpeed's own pointer (read when resuming with no tag)
point "$CKPT/latest" "${TAG}_universal"

stage=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["stage"])' "$RUN/run.json" 2>/dev/null ||
        echo distill)
echo "converted $SRC (saved by $ranks rank(s)) to $OUT; $CKPT/latest now names ${TAG}_universal"
echo "resume it with any number of ranks (the run's own flags, here from its config.json):"
printf '  deepspeed --num_gpus %s train_ds.py --stage %s --config %q --resume\n' "$NUM_GPUS" "$stage" \
  "$RUN/config.json"
