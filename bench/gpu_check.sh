#!/usr/bin/env bash
# The one prepared call for a lent GPU: everything CI cannot see, in at most 8 minutes on one GPU from a bare
# machine, with every result under $OUT.
#   1. distill: a 1-rank bf16 distillation of a random Qwen1.5-1.8B-shaped teacher into the `balanced` student,
#      seq-KD on, a few hundred steps (crash-free, tokens/s, MFU, the seq-KD pass in sources/s);
#   2. bench/train_step.py at its GPU shape (the full step against the teacher-forward-only ceiling, resident and
#      sharded teachers);
#   3. bench/kd_loss.py at its GPU shapes (151,936-id vocabulary, bf16).
# Each part has its own time limit, so one that hangs cannot eat the others' minutes.
#
# On the device machine, from the repository root (carry .whl, made here with `bash ../shared/tools/device_wheels.sh`
# inside .venv, and data/catalogs, in case that machine has no gettext catalogs):
#   bash bench/gpu_check.sh                         # OUT is set by the device tool
# Here, as a dry run of the same steps with every shape shrunk (a medium teacher, the tiny student, CPU shapes):
#   DEVICE=cpu OUT=/tmp/gpu_check PYTHON=.venv/bin/python bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder the results go to}
DEVICE=${DEVICE:-gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
: > "$OUT/parts.log"

note() { echo "[gpu_check $(date +%T)] $*" | tee -a "$OUT/parts.log"; }

part() {  # part NAME SECONDS CMD...: run CMD under a time limit, its output appended to parts.log
  local name=$1 limit=$2
  shift 2
  note "$name: start (limit ${limit}s): $*"
  local began=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >> "$OUT/parts.log" 2>&1
  local rc=$?
  note "$name: rc $rc after $((SECONDS - began))s"
  echo "$name $rc $((SECONDS - began))" >> "$OUT/status.txt"
}

if [ "$DEVICE" = gpu ]; then
  TEACHER_SIZE=qwen1.5-1.8b PRESET=balanced STEPS=300 TOKENS=4096 SHAPE=gpu
  LIMIT_SETUP=120 LIMIT_DISTILL=180 LIMIT_STEP=110 LIMIT_LOSS=60
  if [ -d .whl ]; then  # DeepSpeed and datasets are not on the device image
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || { note "installing .whl failed"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  export TORCH_CUDA_ARCH_LIST=9.0  # DeepSpeed's FusedAdam JIT build fails on the image's '9.0a'
else
  TEACHER_SIZE=medium PRESET=tiny STEPS=20 TOKENS=512 SHAPE=cpu
  LIMIT_SETUP=300 LIMIT_DISTILL=600 LIMIT_STEP=600 LIMIT_LOSS=900
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
: > "$OUT/status.txt"
note "device $DEVICE, python $("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__,
  torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")' 2>&1)"

CACHE=bench/.cache
TEACHER=$CACHE/teacher-$TEACHER_SIZE  # where bench/train_step.py looks for it, so it is built once
mkdir -p "$CACHE"
if [ ! -f "$CACHE/catalogs/train.jsonl" ]; then
  if [ -f data/catalogs/train.jsonl ]; then cp -r data/catalogs "$CACHE/catalogs"
  else part corpus "$LIMIT_SETUP" "$PY" -m scripts.build_corpus --gettext /usr/share/locale --out "$CACHE/catalogs"; fi
fi
[ -f "$TEACHER/config.json" ] || part teacher "$LIMIT_SETUP" "$PY" -m scripts.make_tiny_teacher \
  --corpus "$CACHE/catalogs" --out "$TEACHER" --size "$TEACHER_SIZE" --dtype bfloat16 --force

RUN=$CACHE/gpu_check-distill
rm -rf "$RUN"
part distill "$LIMIT_DISTILL" "$PY" -m deepspeed.launcher.runner --num_gpus 1 train_ds.py --stage distill \
  --teacher "$TEACHER" --data "$CACHE/catalogs" --out "$RUN" --preset "$PRESET" --max_steps "$STEPS" \
  --data.tokens_per_batch "$TOKENS" --train.bf16 on --seq_kd true --eval_every "$STEPS" --save_every "$STEPS" \
  --log_every 25
cp "$RUN/train.log" "$OUT/distill_train.log" 2>/dev/null

part train_step "$LIMIT_STEP" "$PY" -m bench.train_step --shape "$SHAPE" --json "$OUT/train_step.json"
part kd_loss "$LIMIT_LOSS" "$PY" -m bench.kd_loss --shapes "$SHAPE" --methods plain,fused,liger --repeats 3 \
  --json "$OUT/kd_loss.json"

# One summary to read first: what ran, how long, and the distillation's own figures from its metrics.
"$PY" - "$OUT" "$RUN" <<'PYEOF' | tee "$OUT/summary.md"
import json, re, sys
from pathlib import Path
out, run = Path(sys.argv[1]), Path(sys.argv[2])
print("| part | exit code | seconds |\n|---|---:|---:|")
for line in (out / "status.txt").read_text().splitlines():
    name, rc, seconds = line.split()
    print(f"| {name} | {rc} | {seconds} |")
steps = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()] if (run / "metrics.jsonl").is_file() else []
steps = [s for s in steps if "eval" not in s]
log = (run / "train.log").read_text() if (run / "train.log").is_file() else ""
summary = {"steps": len(steps), "skipped": sum("skipped" in s for s in steps)}
if steps:
    tail = steps[len(steps) // 2:]  # past the warm-up
    summary.update(tokens_per_s=sum(s["tokens_per_s"] for s in tail) / len(tail),
                   tflops=sum(s["tflops"] for s in tail) / len(tail), last_loss=steps[-1]["loss"])
mfu = re.findall(r"MFU ([\d.]+)%", log)
seq_kd = re.search(r"seq_kd: (\d+) teacher translations in ([\d.]+) s \(([\d.]+) sources/s", log)
summary.update(mfu_percent=float(mfu[-1]) if mfu else None,
               seq_kd_sources=int(seq_kd.group(1)) if seq_kd else None,
               seq_kd_sources_per_s=float(seq_kd.group(3)) if seq_kd else None,
               placement=(re.search(r"teacher placement: (\w+)", log) or [None, None])[1])
print("\ndistill:", json.dumps(summary))
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
PYEOF
note "done: $OUT/summary.md"
