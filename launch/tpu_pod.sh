#!/usr/bin/env bash
# Runs an mr1 experiment on a Cloud TPU VM pod slice: create it, copy the code (and data) to every
# worker, install, run the job on all workers at once (multi-host JAX), delete it.
# `launch/tpu_pod.sh --help` for the interface; launch/README.md for examples.
set -euo pipefail

PROG="tpu_pod.sh"
# shellcheck source=launch/lib.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMMANDS=(create copy install run exec delete describe all)
LIBTPU_INDEX="https://storage.googleapis.com/jax-releases/libtpu_releases.html"

usage() {
  cat <<EOF
usage: launch/$PROG COMMAND --name NAME [options] [-- EXPERIMENT_FLAGS...]

Commands:
  create     create the TPU VM pod slice (gcloud compute tpus tpu-vm create)
  copy       copy the code (git archive of --ref) and, with --data-dir, a data folder
             to every worker
  install    make a venv on every worker and pip install -e ".[tpu]" into it
  run        run experiments/JOB.py on every worker with MR1_DISTRIBUTED=1
  exec       run the shell command after -- on every worker, in the code folder
             (e.g. fetch model weights: -- gsutil -m cp -r gs://BUCKET/qwen2.5-7b models/)
  delete     delete the pod slice
  describe   show the pod slice (state, workers)
  all        create, copy, install and run, in that order (not delete)

Options:
  --name NAME           TPU VM name (required)
  --zone ZONE           zone (default: $DEFAULT_ZONE)
  --project PROJECT     Google Cloud project (default: gcloud's configured one)
  --accelerator TYPE    accelerator type for create (default: $DEFAULT_ACCELERATOR)
  --version RUNTIME     TPU software version for create (default from the accelerator:
                        v2-alpha-tpuv5 for v5p, v2-alpha-tpuv5-lite for v5litepod,
                        v2-alpha-tpuv6e for v6e, tpu-ubuntu2204-base otherwise)
  --spot                create a Spot (preemptible) slice
  --ref REF             git ref that copy archives (default: HEAD; uncommitted changes
                        are not copied)
  --remote-dir DIR      code folder on the workers, relative to the home folder or
                        absolute (default: $DEFAULT_REMOTE_DIR); the venv is DIR/.venv
  --data-dir DIR        copy: upload this local folder to DIR/data on the workers;
                        run: set MR1_DATA_DIR to that folder (pass it to both, or to all)
  --remote-data-dir DIR run: set MR1_DATA_DIR to this folder on the workers instead
  --job JOB             run: one of ${JOBS[*]}
  --config SPEC         run: --config of the experiment, FILE[:ARG] relative to the repo
  --workdir DIR         run: --workdir of the experiment; every worker writes there, so
                        use a gs:// bucket path (required for run)
  --env NAME=VALUE      run: extra environment variable on the workers (repeatable)
  --detach              run: start the job under nohup (log: REMOTE_DIR/logs/JOB.log on
                        each worker) and return instead of streaming its output
  --dry-run             print each command (prefixed "+ ") instead of running it
  -h, --help            this text

For run, anything after -- is passed to the experiment, e.g. -- --config.model=models/qwen
(a path on the workers; relative paths are relative to the code folder).
EOF
}

# Prints the command ("+ ..."); runs it unless --dry-run.
run_cmd() {
  if ((DRY_RUN)); then
    echo "+ $(quote_all "$@")"
  else
    echo "+ $(quote_all "$@")" >&2
    "$@"
  fi
}

DEFAULT_ZONE="us-east5-a"
DEFAULT_ACCELERATOR="v5p-32"
DEFAULT_REMOTE_DIR="mr1"

COMMAND=""
NAME=""
ZONE="$DEFAULT_ZONE"
PROJECT=""
ACCELERATOR="$DEFAULT_ACCELERATOR"
VERSION=""
SPOT=0
REF="HEAD"
REMOTE_DIR="$DEFAULT_REMOTE_DIR"
DATA_DIR=""
REMOTE_DATA_DIR=""
JOB=""
CONFIG=""
WORKDIR=""
ENVS=()
DETACH=0
DRY_RUN=0
EXTRA=()

while (($#)); do
  arg=$1
  case $arg in
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    --spot) SPOT=1; shift; continue ;;
    --detach) DETACH=1; shift; continue ;;
    --dry-run) DRY_RUN=1; shift; continue ;;
    --name|--name=*|--zone|--zone=*|--project|--project=*|--accelerator|--accelerator=*|\
    --version|--version=*|--ref|--ref=*|--remote-dir|--remote-dir=*|--data-dir|--data-dir=*|\
    --remote-data-dir|--remote-data-dir=*|--job|--job=*|--config|--config=*|\
    --workdir|--workdir=*|--env|--env=*)
      opt_value "$arg" "${2-}" "$(($# > 1))"
      case ${arg%%=*} in
        --name) NAME=$VALUE ;;
        --zone) ZONE=$VALUE ;;
        --project) PROJECT=$VALUE ;;
        --accelerator) ACCELERATOR=$VALUE ;;
        --version) VERSION=$VALUE ;;
        --ref) REF=$VALUE ;;
        --remote-dir) REMOTE_DIR=$VALUE ;;
        --data-dir) DATA_DIR=$VALUE ;;
        --remote-data-dir) REMOTE_DATA_DIR=$VALUE ;;
        --job) JOB=$VALUE ;;
        --config) CONFIG=$VALUE ;;
        --workdir) WORKDIR=$VALUE ;;
        --env) ENVS+=("$VALUE") ;;
      esac
      shift "$SHIFT"
      ;;
    -*) die "unknown option: $arg" ;;
    *)
      [[ -z $COMMAND ]] || die "one command at a time (got '$COMMAND' and '$arg')"
      in_list "$arg" "${COMMANDS[@]}" || die "unknown command '$arg'; one of: ${COMMANDS[*]}"
      COMMAND=$arg
      shift
      ;;
  esac
done

[[ -n $COMMAND ]] || die "no command given; one of: ${COMMANDS[*]}"
[[ -n $NAME ]] || die "--name is required"
[[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
  || die "--name '$NAME': lowercase letters, digits and hyphens, starting with a letter"
[[ -n $ZONE ]] || die "--zone is empty"
[[ -n $REMOTE_DIR && $REMOTE_DIR != *\'* ]] || die "--remote-dir must be a non-empty path"

wants() {  # does COMMAND include step $1?
  [[ $COMMAND == "$1" ]] || { [[ $COMMAND == all ]] && in_list "$1" create copy install run; }
}

if wants create; then
  [[ -n $ACCELERATOR ]] || die "--accelerator is empty"
  if [[ -z $VERSION ]]; then
    case $ACCELERATOR in
      v5p-*) VERSION="v2-alpha-tpuv5" ;;
      v5litepod-*|v5e-*) VERSION="v2-alpha-tpuv5-lite" ;;
      v6e-*) VERSION="v2-alpha-tpuv6e" ;;
      *) VERSION="tpu-ubuntu2204-base" ;;
    esac
  fi
fi
if wants exec; then
  ((${#EXTRA[@]})) || die "exec needs a command after --"
fi
if wants copy && [[ -n $DATA_DIR ]] && ! ((DRY_RUN)); then
  [[ -d $DATA_DIR ]] || die "--data-dir '$DATA_DIR' is not a folder"
fi
if wants run; then
  [[ -n $JOB ]] || die "run needs --job (one of: ${JOBS[*]})"
  JOB=${JOB%.py}
  in_list "$JOB" "${JOBS[@]}" || die "unknown --job '$JOB'; one of: ${JOBS[*]}"
  [[ -n $CONFIG ]] || die "run needs --config (FILE[:ARG], relative to the repo)"
  if in_list --dry-run ${EXTRA[@]+"${EXTRA[@]}"}; then
    die "--dry-run after -- would go to the experiment; put it before --"
  fi
  [[ -n $WORKDIR ]] || die "run needs --workdir (a gs://bucket/path every worker can write)"
  for kv in ${ENVS[@]+"${ENVS[@]}"}; do
    [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env '$kv': expected NAME=VALUE"
  done
  if [[ $WORKDIR != gs://* ]]; then
    echo "$PROG: warning: --workdir '$WORKDIR' is not a gs:// path; each worker writes its own" \
      "local copy and multi-host checkpointing needs a shared one" >&2
  fi
  if [[ ! -f $REPO/${CONFIG%%:*} ]]; then
    echo "$PROG: warning: config file '${CONFIG%%:*}' not found under $REPO" >&2
  fi
fi

# Options every gcloud tpu-vm command takes.
GCLOUD_COMMON=(--zone="$ZONE")
[[ -z $PROJECT ]] || GCLOUD_COMMON+=(--project="$PROJECT")
TPU_VM=(gcloud compute tpus tpu-vm)

ssh_all() {  # ssh_all REMOTE_COMMAND: run it on every worker
  run_cmd "${TPU_VM[@]}" ssh "$NAME" "${GCLOUD_COMMON[@]}" --worker=all --command="$1"
}

# The remote folder in a remote shell: relative paths are relative to the home folder, where
# gcloud's ssh starts.
RDIR=$(quote "$REMOTE_DIR")

step_create() {
  local cmd=("${TPU_VM[@]}" create "$NAME" "${GCLOUD_COMMON[@]}"
             --accelerator-type="$ACCELERATOR" --version="$VERSION")
  if ((SPOT)); then
    cmd+=(--spot)
  fi
  run_cmd "${cmd[@]}"
}

step_copy() {
  local tmp=${TMPDIR:-/tmp}
  tmp=${tmp%/}
  local code_tar="$tmp/mr1-$NAME-code.tar.gz" data_tar="$tmp/mr1-$NAME-data.tar.gz"
  local sources=("$code_tar")
  run_cmd git -C "$REPO" archive --format=tar.gz -o "$code_tar" "$REF"
  if [[ -n $DATA_DIR ]]; then
    run_cmd tar -czf "$data_tar" -C "$DATA_DIR" .
    sources+=("$data_tar")
  fi
  run_cmd "${TPU_VM[@]}" scp "${sources[@]}" "$NAME:/tmp/" "${GCLOUD_COMMON[@]}" --worker=all
  local remote="mkdir -p $RDIR && tar -xzf /tmp/mr1-$NAME-code.tar.gz -C $RDIR"
  if [[ -n $DATA_DIR ]]; then
    remote+=" && mkdir -p $RDIR/data && tar -xzf /tmp/mr1-$NAME-data.tar.gz -C $RDIR/data"
  fi
  remote+=" && rm -f /tmp/mr1-$NAME-code.tar.gz"
  [[ -z $DATA_DIR ]] || remote+=" /tmp/mr1-$NAME-data.tar.gz"
  ssh_all "$remote"
  run_cmd rm -f "${sources[@]}"
}

step_install() {
  # TPU VM images may lack python3-venv; install it when the first attempt fails.
  local venv="(test -x .venv/bin/pip || python3 -m venv .venv || (sudo apt-get update -qq"
  venv+=" && sudo apt-get install -y -qq python3-venv && python3 -m venv --clear .venv))"
  local pip
  pip="pip install -q --upgrade pip && pip install -q -e $(quote '.[tpu]') -f $LIBTPU_INDEX"
  ssh_all "cd $RDIR && $venv && . .venv/bin/activate && $pip"
}

step_run() {
  local envs="MR1_DISTRIBUTED=1"
  if [[ -n $REMOTE_DATA_DIR ]]; then
    envs+=" MR1_DATA_DIR=$(quote "$REMOTE_DATA_DIR")"
  elif [[ -n $DATA_DIR ]]; then
    envs+=" MR1_DATA_DIR=\"\$PWD/data\""
  fi
  local kv
  for kv in ${ENVS[@]+"${ENVS[@]}"}; do
    envs+=" ${kv%%=*}=$(quote "${kv#*=}")"
  done
  local exp
  exp=$(quote_all python "experiments/$JOB.py" "--config=$CONFIG" "--workdir=$WORKDIR" \
        ${EXTRA[@]+"${EXTRA[@]}"})
  local remote="cd $RDIR && . .venv/bin/activate && "
  if ((DETACH)); then
    remote+="mkdir -p logs && { $envs nohup $exp > logs/$JOB.log 2>&1 < /dev/null & }"
  else
    remote+="$envs $exp"
  fi
  ssh_all "$remote"
}

step_exec() {
  ssh_all "cd $RDIR && ${EXTRA[*]}"
}

step_delete() {
  run_cmd "${TPU_VM[@]}" delete "$NAME" "${GCLOUD_COMMON[@]}" --quiet
}

step_describe() {
  run_cmd "${TPU_VM[@]}" describe "$NAME" "${GCLOUD_COMMON[@]}"
}

for step in create copy install run exec delete describe; do
  if wants "$step"; then
    "step_$step"
  fi
done
