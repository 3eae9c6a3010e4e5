#!/usr/bin/env bash
# Runs an mr1 experiment on one host with one or more NVIDIA GPUs: a single JAX process that sees
# all of them (single-process multi-device; no MR1_DISTRIBUTED).
# `launch/gpu.sh --help` for the interface; launch/README.md for examples.
set -euo pipefail

PROG="gpu.sh"
# shellcheck source=launch/lib.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat <<EOF
usage: launch/$PROG --job JOB --config SPEC [options] [-- EXPERIMENT_FLAGS...]

Runs python experiments/JOB.py --config=SPEC [--workdir=DIR] EXPERIMENT_FLAGS... from the repo
root as one process over the chosen GPUs.

Options:
  --job JOB             one of ${JOBS[*]}
  --config SPEC         --config of the experiment, FILE[:ARG] relative to the repo
  --workdir DIR         --workdir of the experiment (default: the experiment's own)
  --gpus LIST           GPU ids, e.g. 0,1,2,3 (sets CUDA_VISIBLE_DEVICES; default: all)
  --mem-fraction F      XLA_PYTHON_CLIENT_MEM_FRACTION, the share of each GPU's memory JAX
                        preallocates (default: 0.9)
  --install             first pip install -e ".[cuda]" into the Python that runs the job
  --python PYTHON       the Python to use (default: \$PYTHON, else python3)
  --dry-run             print each command (prefixed "+ ") instead of running it
  -h, --help            this text

Anything after -- is passed to the experiment, e.g. -- --config.model=/path/to/hf_folder
EOF
}

JOB=""
CONFIG=""
WORKDIR=""
GPUS=""
MEM_FRACTION="0.9"
INSTALL=0
PY="${PYTHON:-python3}"
DRY_RUN=0
EXTRA=()

while (($#)); do
  arg=$1
  case $arg in
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    --install) INSTALL=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --job|--job=*|--config|--config=*|--workdir|--workdir=*|--gpus|--gpus=*|\
    --mem-fraction|--mem-fraction=*|--python|--python=*)
      opt_value "$arg" "${2-}" "$(($# > 1))"
      case ${arg%%=*} in
        --job) JOB=$VALUE ;;
        --config) CONFIG=$VALUE ;;
        --workdir) WORKDIR=$VALUE ;;
        --gpus) GPUS=$VALUE ;;
        --mem-fraction) MEM_FRACTION=$VALUE ;;
        --python) PY=$VALUE ;;
      esac
      shift "$SHIFT"
      ;;
    -*) die "unknown option: $arg" ;;
    *) die "unexpected argument '$arg' (experiment flags go after --)" ;;
  esac
done

[[ -n $JOB ]] || die "--job is required (one of: ${JOBS[*]})"
JOB=${JOB%.py}
in_list "$JOB" "${JOBS[@]}" || die "unknown --job '$JOB'; one of: ${JOBS[*]}"
if in_list --dry-run ${EXTRA[@]+"${EXTRA[@]}"}; then
  die "--dry-run after -- would go to the experiment; put it before --"
fi
[[ -n $CONFIG ]] || die "--config is required (FILE[:ARG], relative to the repo)"
if [[ -n $GPUS && $GPUS != all ]]; then
  [[ $GPUS =~ ^[0-9]+(,[0-9]+)*$ ]] \
    || die "--gpus '$GPUS': expected comma-separated ids, e.g. 0,1,2,3"
fi
[[ $MEM_FRACTION =~ ^(0?\.[0-9]*[1-9][0-9]*|1(\.0*)?)$ ]] \
  || die "--mem-fraction '$MEM_FRACTION': expected a number in (0, 1]"
[[ -n $PY ]] || die "--python is empty"

if ((DRY_RUN)); then
  echo "+ cd $(quote "$REPO")"
else
  echo "+ cd $(quote "$REPO")" >&2
  cd "$REPO"
fi

if ((INSTALL)); then
  install=("$PY" -m pip install -e ".[cuda]")
  if ((DRY_RUN)); then
    echo "+ $(quote_all "${install[@]}")"
  else
    echo "+ $(quote_all "${install[@]}")" >&2
    "${install[@]}"
  fi
fi

envs=()
if [[ -n $GPUS && $GPUS != all ]]; then
  envs+=("CUDA_VISIBLE_DEVICES=$GPUS")
fi
envs+=("XLA_PYTHON_CLIENT_MEM_FRACTION=$MEM_FRACTION")
cmd=("$PY" "experiments/$JOB.py" "--config=$CONFIG")
[[ -z $WORKDIR ]] || cmd+=("--workdir=$WORKDIR")
cmd+=(${EXTRA[@]+"${EXTRA[@]}"})

line="$(quote_all "${envs[@]}") $(quote_all "${cmd[@]}")"
if ((DRY_RUN)); then
  echo "+ $line"
  exit 0
fi
if [[ -n ${MR1_DISTRIBUTED-} ]]; then
  echo "+ unset MR1_DISTRIBUTED  # one process sees all GPUs; no jax.distributed" >&2
  unset MR1_DISTRIBUTED
fi
echo "+ $line" >&2
export "${envs[@]}"
exec "${cmd[@]}"
