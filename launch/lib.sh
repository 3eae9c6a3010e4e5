# Shared by launch/gpu.sh and launch/tpu_pod.sh (sourced; they set PROG first).
# shellcheck shell=bash

# The experiments a launcher can run (experiments/<job>.py).
# shellcheck disable=SC2034  # used by the scripts that source this file
JOBS=(grpo_answer ppo_answer grpo_memory ppo_memory evaluate build_memory)

die() {
  echo "$PROG: $*" >&2
  echo "$PROG: see launch/$PROG --help" >&2
  exit 2
}

# One argument quoted for a POSIX shell: bare when it needs no quoting, --opt='a value' for an
# option with a value.
quote() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$s"
  elif [[ $s =~ ^(--?[A-Za-z0-9][A-Za-z0-9_.-]*=)(.*)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    quote "${BASH_REMATCH[2]}"
  else
    local sq="'\\''"
    printf "'%s'" "${s//\'/$sq}"
  fi
}

# A whole command line, each argument quoted.
quote_all() {
  local out="" arg
  for arg in "$@"; do
    out+="${out:+ }$(quote "$arg")"
  done
  printf '%s' "$out"
}

in_list() {
  local want=$1 item
  shift
  for item in "$@"; do
    [[ $item == "$want" ]] && return 0
  done
  return 1
}

# Value of an option given as "--opt value" or "--opt=value"; sets SHIFT to the words used.
opt_value() {
  local opt=$1 next=${2-} has_next=$3
  if [[ $opt == *=* ]]; then
    VALUE=${opt#*=}
    SHIFT=1
  elif ((has_next)); then
    VALUE=$next
    SHIFT=2
  else
    die "option $opt needs a value"
  fi
}
