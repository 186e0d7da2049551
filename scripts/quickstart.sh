#!/usr/bin/env bash
# The whole product on the built-in default, on a fresh machine with no GPU (about 20-30 minutes on 2 cores):
# catalog corpus -> tiny Qwen-shaped teacher -> teacher fine-tuning (ZeRO-3) -> distillation of the `tiny`
# student (ZeRO-3, teacher co-hosted) -> evaluation in both directions -> rv1126b deployment bundle -> run report
# (RUN/report.md with a results table, training plots and example translations).
#
#   bash scripts/quickstart.sh                 # every stage; finished stages are skipped
#   bash scripts/quickstart.sh --force         # redo every stage
#   bash scripts/quickstart.sh --only distill  # one stage (corpus|teacher|sft|distill|evaluate|deploy|report)
#
# Variables: RUN (runs/quickstart), DIST (the deploy output, RUN/dist/rv1126b), NUM_GPUS (all GPUs, or 2 CPU
# ranks), SFT_STEPS, DISTILL_STEPS. Every command is printed (`+ ...`, on stderr) before it runs.
set -euo pipefail
cd "$(dirname "$0")/.."

RUN=${RUN:-runs/quickstart}
DIST=${DIST:-$RUN/dist/rv1126b}
SFT_STEPS=${SFT_STEPS:-800}
DISTILL_STEPS=${DISTILL_STEPS:-1200}
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
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
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

if stage corpus data/catalogs/stats.json; then
  run $PY scripts/build_corpus.py --gettext /usr/share/locale --out data/catalogs
fi
if stage teacher models/tiny-qwen/config.json; then
  run $PY scripts/make_tiny_teacher.py --corpus data/catalogs --out models/tiny-qwen --force
fi
if stage sft "$RUN/sft/final/config.json"; then
  rm -rf "$RUN/sft"
  run .venv/bin/deepspeed --num_gpus "$NUM_GPUS" train_ds.py --stage sft --teacher models/tiny-qwen \
    --data data/catalogs --out "$RUN/sft" --max_steps "$SFT_STEPS" --eval_every 200 --save_every 200 \
    --micro_batch_size 32 --lr 3e-3 --warmup_steps 30 --data.valid_subset 64 --log_every 50
fi
if stage distill "$RUN/distill/final/config.json"; then
  rm -rf "$RUN/distill"
  run .venv/bin/deepspeed --num_gpus "$NUM_GPUS" train_ds.py --stage distill --teacher "$RUN/sft/final" \
    --data data/catalogs --preset tiny --out "$RUN/distill" --max_steps "$DISTILL_STEPS" --eval_every 300 \
    --save_every 300 --micro_batch_size 32 --lr 2e-3 --warmup_steps 50 --data.valid_subset 64 --log_every 50
fi
if stage evaluate "$RUN/eval.json"; then
  for model in "$RUN/sft/final" "$RUN/distill/final"; do
    for direction in zh-en en-zh; do
      run $PY -m inference.evaluate --model "$model" --test data/catalogs/test.jsonl --direction "$direction" \
        --limit 200 --json > "$RUN/eval.$(basename "$(dirname "$model")").$direction.json"
    done
  done
  $PY - "$RUN" <<'PYEOF'
import json, sys, pathlib
run = pathlib.Path(sys.argv[1])
results = {p.name[5:-5]: json.loads(p.read_text()) for p in sorted(run.glob("eval.*.*.json"))}
(run / "eval.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
for name, r in results.items():
    print(f"{name:<18} BLEU {r['bleu']:6.2f}  chrF {r['chrf']:6.2f}  {r['ms_per_sentence']:8.2f} ms/sentence  "
          f"{r['params']:>12,} parameters")
PYEOF
fi
if stage deploy "$DIST/report.json"; then
  run $PY -m deploy --model "$RUN/distill/final" --target rv1126b --calib data/catalogs/valid.jsonl \
    --test data/catalogs/test.jsonl --out "$DIST"
fi
if stage report ""; then  # cheap: always re-rendered
  run $PY -m inference.report --run "$RUN" --dist "$DIST"
fi
echo "== done. Report: $RUN/report.md  Deployment bundle: $DIST  TensorBoard: bash scripts/tensorboard.sh $RUN"
