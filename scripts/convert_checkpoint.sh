#!/usr/bin/env bash
# Make a checkpoint resumable with another number of ranks (GPUs): converts RUN/checkpoints/TAG, ZeRO shards with one
# set per rank that saved it, into DeepSpeed's universal format (one folder per parameter with its fp32 weights and
# Adam moments) in RUN/checkpoints/TAG_universal with DeepSpeed's converter (deepspeed.checkpoint.ds_to_universal),
# then points RUN/checkpoints/latest at it. `train_ds.py --resume` loads a *_universal tag with DeepSpeed's
# load_universal on any number of ranks; the checkpoints the resumed run saves are ordinary ones again.
#   RUN=runs/distill bash scripts/convert_checkpoint.sh               # the checkpoint `latest` names
#   RUN=runs/distill TAG=step2000 bash scripts/convert_checkpoint.sh  # another one
#   then, e.g. saved on 2 GPUs, resumed on 4:
#   deepspeed --num_gpus 4 train_ds.py --stage distill --config runs/distill/config.json --out runs/distill --resume
# Variables (all optional):
#   RUN              the run folder (default runs/distill; a relative path is from the repository root)
#   TAG              the checkpoint to convert, a stepN folder of RUN/checkpoints (default: the one `latest` names)
#   EXTRACT_WORKERS  processes reading the ranks' shards (default 4, DeepSpeed's; 1 runs it in this process)
#   MERGE_WORKERS    processes merging the pieces per parameter (default 2, DeepSpeed's; they need the most memory)
#   NUM_GPUS         only for the command printed at the end: the ranks to resume with (default: N)
#   PYTHON           the interpreter with DeepSpeed (default .venv/bin/python, else python3)
#   DRY_RUN=1        print the resolved command and exit without running it
# It prints its resolved command first, as one line `convert_checkpoint: python ...` (shell-quoted), and at the end
# the command that resumes the run. Run it once the job has stopped, on a machine that sees every rank's shards.
# The conversion is written under TAG_universal.tmp and renamed when complete; `latest` moves (atomically) only
# after that, so a failed conversion leaves the run as it was. A universal folder holds about 12 bytes a parameter
# and is not pruned by --keep: delete it once the resumed run has saved a checkpoint of its own.
# The global batch is micro_batch_size x grad_accum x ranks: to keep it with other ranks, resume with another
# --grad_accum (or --micro_batch_size). The learning-rate schedule goes on from the saved step either way.
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=convert_checkpoint.sh

usage() { sed -n '2,/^set -euo/p' "scripts/$NAME" | sed '$d' | sed 's/^# \{0,1\}//'; }  # the comment above
die() { echo "$NAME: $*" >&2; exit 1; }

case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  "") ;;
  *) die "unknown argument '$1'; settings are variables (RUN=... TAG=... bash scripts/$NAME), see --help" ;;
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

# ---- what to convert: one-line errors before anything is written
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
  *_universal) die "TAG=$TAG is universal already: resume it with any number of ranks (train_ds.py --resume $TAG)" ;;
esac
[[ "$TAG" =~ ^step[0-9]+$ ]] || die "TAG=$TAG: give a checkpoint tag such as step200 (checkpoints: $(list_tags))"
SRC=$CKPT/$TAG
[ -d "$SRC" ] || die "TAG=$TAG: no checkpoint $SRC (checkpoints: $(list_tags))"
shards=("$SRC"/*_optim_states.pt)
[ -f "${shards[0]}" ] || die "$SRC has no optimizer shards (*_optim_states.pt): not a DeepSpeed ZeRO checkpoint"
ranks=$(find "$SRC" -maxdepth 1 -name '*zero_pp_rank_*_mp_rank_00_optim_states.pt' | wc -l)

OUT=$CKPT/${TAG}_universal
TMP=$OUT.tmp
# -W: runpy's warning about `-m` on a module that its package has imported already is harmless here.
# --inject_missing_state: ZeRO-1/2 checkpoints of a plain model carry no universal_checkpoint_info (ZeRO-3: unused).
cmd=("$PYTHON" -W ignore::RuntimeWarning:runpy -m deepspeed.checkpoint.ds_to_universal
     --input_folder "$SRC" --output_folder "$TMP" --num_extract_workers "$EXTRACT_WORKERS"
     --num_merge_workers "$MERGE_WORKERS" --inject_missing_state)
printf 'convert_checkpoint:'
printf ' %q' "${cmd[@]}"
printf '\n'
if [ "$DRY_RUN" = 1 ]; then exit 0; fi

point() {  # point FILE TAG: write FILE.convert.tmp, flush it to disk, rename it over FILE (atomic)
  printf '%s' "$2" > "$1.convert.tmp"
  sync "$1.convert.tmp" 2>/dev/null || true
  mv -f "$1.convert.tmp" "$1"
}

# ---- convert under a temporary name, then publish: the folder first, the pointers last. The converter writes
# DeepSpeed's own pointer (latest_universal, naming its output folder) when it is done: put it back on a failure.
was_universal=$(cat "$CKPT/latest_universal" 2>/dev/null || true)
rm -rf "$TMP"
if ! "${cmd[@]}"; then
  rm -rf "$TMP"
  if [ -n "$was_universal" ]; then
    point "$CKPT/latest_universal" "$was_universal"
  else
    rm -f "$CKPT/latest_universal"
  fi
  die "conversion of $SRC failed (see above); nothing changed: $CKPT/latest still names" \
      "$(cat "$CKPT/latest" 2>/dev/null || echo nothing)"
fi
rm -rf "$OUT"
mv "$TMP" "$OUT"
point "$CKPT/latest_universal" "${TAG}_universal"  # what DeepSpeed reads when it loads a universal checkpoint untagged
point "$CKPT/latest" "${TAG}_universal"

# ---- what to run next: the run's own settings (its config.json, when train_ds.py can take it) on any ranks
next=$("$PYTHON" -c '
import json, shlex, sys
from pathlib import Path
run, ranks = Path(sys.argv[1]), sys.argv[2]
stage = json.loads((run / "run.json").read_text())["stage"] if (run / "run.json").is_file() else "distill"
out = Path(str(json.loads((run / "config.json").read_text()).get("train", {}).get("out", "/")))
config = shlex.quote(str(run / "config.json"))
# train_ds.py refuses a --config file whose train.out leaves the working folder: then the flags are needed
flags = f"--config {config}" if not out.is_absolute() and ".." not in out.parts else f"<the run flags; see {config}>"
print(f"deepspeed --num_gpus {ranks} train_ds.py --stage {stage} {flags} --out {shlex.quote(str(run))} --resume")
'  "$RUN" "$NUM_GPUS" 2>/dev/null) ||
  next="deepspeed --num_gpus $NUM_GPUS train_ds.py <the run flags> --out $RUN --resume"
echo "converted $SRC (saved by $ranks rank(s)) to $OUT; $CKPT/latest now names ${TAG}_universal"
echo "resume it with any number of ranks:"
echo "  $next"
