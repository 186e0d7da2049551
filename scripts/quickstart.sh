#!/usr/bin/env bash
# The whole product on the built-in default, on a fresh machine with no GPU (about 15 minutes on 2 cores):
# catalog corpus and its short-label subset -> the stored tiny Qwen-shaped teacher, fine-tuned on the labels
# (ZeRO) -> distillation of the `tiny` student on them (teacher co-hosted, seq-KD) -> evaluation on the label test
# subset and on the full test split -> rv1126b deployment bundle -> run report (RUN/report.md: results table,
# training plots, example translations).
#
#   bash scripts/quickstart.sh                 # every stage; finished stages are skipped
#   bash scripts/quickstart.sh --force         # redo every stage
#   bash scripts/quickstart.sh --only distill  # one stage (corpus|teacher|sft|distill|evaluate|deploy|report)
#   TEACHER=scratch bash scripts/quickstart.sh --force   # no stored weights: a random teacher fine-tuned here
#
# Variables: RUN (runs/quickstart), DIST (the deploy output, RUN/dist/rv1126b), NUM_GPUS (all GPUs, or 2 CPU
# ranks), TEACHER (stored | scratch), SFT_STEPS, DISTILL_STEPS (default: the recipes' max_steps). The recipes of
# both training stages are scripts/recipes/labels-sft.yaml and labels-distill.yaml (bench/kd_methods.py uses them
# too). Every command is printed (`+ ...`, on stderr).
#
# Why short labels and a stored teacher: on 2 CPU cores a model trained from scratch learns UI labels ("Open File",
# "打开文件") in minutes, and sentences not at all. A teacher must be better than its student for distillation to
# teach anything, and a decoder-only teacher reading a chat prompt learns at half the student's speed, so the teacher
# that starts here was fine-tuned once, ahead of time, with this project's own `train_ds.py --stage sft`
# (models/tiny-qwen-catalogs: README.md holds the command, its log and scores). Its training catalogs are this corpus's
# train split, checked here; TEACHER=scratch does the same from random weights in this run.
set -euo pipefail
cd "$(dirname "$0")/.."

RUN=${RUN:-runs/quickstart}
DIST=${DIST:-$RUN/dist/rv1126b}
TEACHER=${TEACHER:-stored}
STORED=models/tiny-qwen-catalogs
SCRATCH=(--max_steps 4000 --eval_every 1000 --save_every 1000 --lr 2e-3)  # random weights learn for longer
case "$TEACHER" in
  stored|scratch) ;;
  *) echo "quickstart: TEACHER=$TEACHER: use stored or scratch" >&2; exit 2 ;;
esac
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  NUM_GPUS=${NUM_GPUS:-$(nvidia-smi -L | wc -l)}
else
  NUM_GPUS=${NUM_GPUS:-2}  # CPU ranks (gloo)
fi
FORCE=0
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --force) FORCE=1 ;;
    --only) ONLY=$2; shift ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "quickstart: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

bash scripts/setup.sh
PY=.venv/bin/python
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

run() {  # run CMD...: print the resolved command (stderr, so stdout stays the command's own), then run it
  printf '+' >&2
  printf ' %q' "$@" >&2
  printf '\n' >&2
  "$@"
}

stage() {  # stage NAME DONE_MARKER: true when the stage should run (an empty marker: always)
  local name=$1 marker=$2
  if [ -n "$ONLY" ] && [ "$ONLY" != "$name" ]; then return 1; fi
  if [ "$FORCE" = 0 ] && [ -n "$marker" ] && [ -e "$marker" ]; then echo "== $name: done already ($marker; --force to redo)"; return 1; fi
  echo "== $name"
  return 0
}

if stage corpus data/labels/stats.json; then
  run $PY -m scripts.build_corpus --gettext /usr/share/locale --out data/catalogs --labels data/labels
fi
START=$STORED
[ "$TEACHER" = scratch ] && START=models/tiny-qwen
if stage teacher ""; then  # cheap: the stored teacher is always checked against this machine's corpus
  if [ "$TEACHER" = stored ] && ! run $PY -m scripts.stored_teacher check "$STORED" data/catalogs; then
    echo "quickstart: the stored teacher does not fit this machine's corpus (see above); fine-tuning one from" \
         "random weights instead (TEACHER=scratch)" >&2
    TEACHER=scratch START=models/tiny-qwen
  fi
  if [ "$TEACHER" = scratch ] && { [ "$FORCE" = 1 ] || [ ! -e "$START/config.json" ]; }; then
    run $PY -m scripts.make_tiny_teacher --corpus data/labels --out "$START" --vocab_size 3000 \
      --attention_dropout 0.1 --force
  fi
fi
if stage sft "$RUN/sft/final/config.json"; then
  rm -rf "$RUN/sft"
  extra=()
  [ "$TEACHER" = scratch ] && extra=("${SCRATCH[@]}")
  [ -n "${SFT_STEPS:-}" ] && extra+=(--max_steps "$SFT_STEPS")
  run .venv/bin/deepspeed --num_gpus "$NUM_GPUS" train_ds.py --stage sft --config scripts/recipes/labels-sft.yaml \
    --teacher "$START" --out "$RUN/sft" "${extra[@]}"
fi
if stage distill "$RUN/distill/final/config.json"; then
  rm -rf "$RUN/distill"
  run .venv/bin/deepspeed --num_gpus "$NUM_GPUS" train_ds.py --stage distill \
    --config scripts/recipes/labels-distill.yaml --teacher "$RUN/sft/final" --out "$RUN/distill" \
    ${DISTILL_STEPS:+--max_steps "$DISTILL_STEPS"}
fi
if stage evaluate "$RUN/eval.json"; then
  for model in sft distill; do
    for direction in zh-en en-zh; do  # every label test pair, a fixed sample of 8 kept; 200 pairs of the full split
      run $PY -m inference.evaluate --model "$RUN/$model/final" --test data/labels/test.jsonl \
        --direction "$direction" --examples 8 --json > "$RUN/eval.$model.labels.$direction.json"
      run $PY -m inference.evaluate --model "$RUN/$model/final" --test data/catalogs/test.jsonl \
        --direction "$direction" --limit 200 --examples 12 --json > "$RUN/eval.$model.full.$direction.json"
    done
  done
  $PY - "$RUN" <<'PYEOF'
import json, sys, pathlib
run = pathlib.Path(sys.argv[1])
scores = {"labels": {}, "full": {}}
for path in sorted(run.glob("eval.*.*.*.json")):
    _, model, subset, direction, _ = path.name.split(".")
    scores[subset][f"{model}.{direction}"] = json.loads(path.read_text())
splits = {"labels": "data/labels/test.jsonl", "full": "data/catalogs/test.jsonl (first 200 pairs)"}
(run / "eval.json").write_text(json.dumps({"splits": splits, "scores": scores}, indent=2, ensure_ascii=False) + "\n")
for subset, results in scores.items():
    for name, r in results.items():
        print(f"{subset:<7} {name:<14} BLEU {r['bleu']:6.2f}  chrF {r['chrf']:6.2f}  {r['ms_per_sentence']:8.2f} "
              f"ms/sentence  {r['params']:>12,} parameters")
PYEOF
fi
if stage deploy "$DIST/report.json"; then
  # --limit 1000: every label test pair (720 share no side with the calibration pairs), so the deployed rows of the
  # report are scored on the same subset as the PyTorch ones (the simulator adds about 3 minutes for it)
  run $PY -m deploy --model "$RUN/distill/final" --target rv1126b --calib data/labels/valid.jsonl \
    --test data/labels/test.jsonl --out "$DIST" --limit 1000
fi
if stage report ""; then  # cheap: always re-rendered
  run $PY -m inference.report --run "$RUN" --dist "$DIST"
fi
echo "== done. Report: $RUN/report.md  Deployment bundle: $DIST  TensorBoard: bash scripts/tensorboard.sh $RUN"
