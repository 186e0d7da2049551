# Sourced by run_teacher_sft.sh and run_distill.sh: the DeepSpeed launcher command they share.
# Launcher variables (all optional):
#   NUM_GPUS       ranks per node (default: every GPU nvidia-smi lists, else 2 CPU ranks)
#   HOSTFILE       multi-node: a DeepSpeed hostfile (`host slots=N` lines; see scripts/hostfile.example). DeepSpeed
#                  starts the other nodes with pdsh over passwordless ssh.
#   NUM_NODES      use the first NUM_NODES hosts of HOSTFILE (default: all of them)
#   MASTER_ADDR    rank 0's address (default: DeepSpeed's own: 127.0.0.1 on one node, `hostname -I` of the first
#                  host over ssh with a hostfile)
#   MASTER_PORT    rank 0's port (default 29500); give each job on a node its own
#   LAUNCHER_ARGS  more `deepspeed` launcher flags, split on spaces, e.g. "--no_ssh_check" for a hostfile that
#                  lists only localhost, or "--launcher openmpi"
#   DEEPSPEED      the launcher (default .venv/bin/deepspeed, else `deepspeed` on PATH)
#   DRY_RUN=1      print the resolved command and exit without running it
# Every run prints its resolved command first, as one line `NAME: deepspeed ...` (shell-quoted).

if [ -z "${NUM_GPUS:-}" ]; then
  NUM_GPUS=$( (nvidia-smi -L 2>/dev/null || true) | wc -l)
  [ "$NUM_GPUS" -gt 0 ] || NUM_GPUS=2  # no GPU: CPU ranks (gloo)
fi
MASTER_PORT=${MASTER_PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-}
LAUNCHER_ARGS=${LAUNCHER_ARGS:-}
DRY_RUN=${DRY_RUN:-0}
if [ -z "${DEEPSPEED:-}" ]; then
  if [ -x .venv/bin/deepspeed ]; then DEEPSPEED=.venv/bin/deepspeed; else DEEPSPEED=deepspeed; fi
fi

# Training variables are train_ds.py flags: flags_from_variables VAR=--flag ... appends `--flag "$VAR"` to FLAGS for
# each VAR that is set. One that is not set passes nothing, so config.py's default applies (train_ds.py --help
# lists them all) and the scripts hold no second copy of any default.
FLAGS=()
flags_from_variables() {
  local pair var
  for pair in "$@"; do
    var=${pair%%=*}
    if [ -n "${!var:-}" ]; then FLAGS+=("${pair#*=}" "${!var}"); fi
  done
}

deepspeed_launch() {  # deepspeed_launch NAME TRAIN_DS_ARGS...: print the resolved command, then exec it
  local name=$1
  shift
  local launcher=(--master_port "$MASTER_PORT") extra=()
  if [ -n "$MASTER_ADDR" ]; then launcher+=(--master_addr "$MASTER_ADDR"); fi
  if [ -n "${HOSTFILE:-}" ]; then
    launcher+=(--hostfile "$HOSTFILE")
    if [ -n "${NUM_NODES:-}" ]; then launcher+=(--num_nodes "$NUM_NODES"); fi
  fi
  read -ra extra <<< "$LAUNCHER_ARGS"
  local cmd=("$DEEPSPEED" "${launcher[@]}" "${extra[@]}" --num_gpus "$NUM_GPUS" train_ds.py "$@")
  printf '%s:' "$name"
  printf ' %q' "${cmd[@]}"
  printf '\n'
  if [ "$DRY_RUN" = 1 ]; then exit 0; fi
  exec "${cmd[@]}"
}
