#!/usr/bin/env bash
# The one prepared accelerator check (issue 23): run from the repo root on a machine with one
# GPU; everything it makes goes to $OUT (default: device_out/).
#
#   launch/fetch_wheels.sh                 # first, where pip works: wheels the GPU image lacks
#   OUT=/some/dir launch/device_check.sh   # on the GPU machine (no network needed)
#
# Steps, each bounded so the whole fits one 10-minute device command:
#   1. installs .whl/*.whl (nltk, defusedxml, ml-collections) into a private folder
#      (--no-index --no-deps) and puts it and the repo on PYTHONPATH;
#   2. $OUT/env.txt: nvidia-smi and the versions of python, jax, flax, torch, transformers;
#   3. pytest -m device over the test files that hold such tests, at most TEST_LIMIT s
#      (default 190) -> $OUT/pytest_device.txt;
#   4. experiments/benchmarks/bench_device.py --out $OUT, at most BENCH_LIMIT s (default 320;
#      no row starts after BENCH_LIMIT - 60 s) -> $OUT/bench_device.{json,md,log};
#   5. $OUT/summary.txt: the exit status of each step and the pytest tally.
# STAGES=tests or STAGES=bench runs one of steps 3-4 (STAGES=none: steps 1-2 only);
# STAGES=probe: the rollout_7b row again with XLA_FLAGS=$PROBE_FLAGS (default: dynamic-slice
# fusion), then the rollout_7b_unrolled row, each at most PROBE_LIMIT s (default 150)
# -> $OUT/probe/ and $OUT/unrolled/bench_device.{json,md};
# BENCH_ARGS adds arguments to bench_device.py (--smoke: the CPU shapes; --rows=...).
# Exits non-zero if a step failed.
set -uo pipefail
if [[ ${1-} == -h || ${1-} == --help ]]; then
  sed -n '2,22p' "$0"
  exit 0
fi

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
OUT=${OUT:-$REPO/device_out}
PY=${PYTHON:-python3}
TEST_LIMIT=${TEST_LIMIT:-190}
BENCH_LIMIT=${BENCH_LIMIT:-320}
STAGES=${STAGES:-tests,bench}
PROBE_LIMIT=${PROBE_LIMIT:-150}
PROBE_FLAGS=${PROBE_FLAGS:---xla_gpu_enable_dynamic_slice_fusion=true}
SITE=${MR1_SITE:-/tmp/mr1_site}
mkdir -p "$OUT"

export PYTHONPATH="$REPO"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl || { echo "wheel install failed" >&2; exit 2; }
  export PYTHONPATH="$REPO:$SITE"
fi
export MR1_OFFLINE=1 PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.8}  # torch peers too

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  "$PY" - <<'EOF' 2>&1
import importlib, sys
print("python", sys.version.split()[0])
for name in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "nltk", "ml_collections"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:  # noqa: BLE001
        print(name, "MISSING", type(e).__name__, e)
import jax
print("devices", jax.devices())
EOF
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

tests_rc=skipped
bench_rc=skipped
probe_rc=skipped
if [[ ,$STAGES, == *,tests,* ]]; then
  mapfile -t files < <(grep -l "mark.device" tests/test_*.py)
  echo "+ pytest -m device ${files[*]} (limit ${TEST_LIMIT} s)"
  timeout -k 10 "$TEST_LIMIT" "$PY" -m pytest -v -m device -p no:cacheprovider \
    --durations=20 "${files[@]}" 2>&1 \
    | tee "$OUT/pytest_device.txt"
  tests_rc=${PIPESTATUS[0]}
fi
if [[ ,$STAGES, == *,probe,* ]]; then
  # the 7B decode step with XLA's dynamic-slice fusion (layer weights read in place by the
  # GEMMs instead of copied out of the stacked [L, ...] arrays first), then with the layers
  # unrolled (static weight slices)
  echo "+ XLA_FLAGS=$PROBE_FLAGS bench_device.py --rows=rollout_7b --out $OUT/probe"
  XLA_FLAGS="$PROBE_FLAGS" timeout -k 10 "$PROBE_LIMIT" "$PY" \
    experiments/benchmarks/bench_device.py --rows=rollout_7b --out "$OUT/probe" 2>&1 \
    | tail -n 40
  probe_rc=${PIPESTATUS[0]}
  echo "+ bench_device.py --rows=rollout_7b_unrolled --out $OUT/unrolled"
  timeout -k 10 "$PROBE_LIMIT" "$PY" experiments/benchmarks/bench_device.py \
    --rows=rollout_7b_unrolled --out "$OUT/unrolled" 2>&1 | tail -n 40
  unrolled_rc=${PIPESTATUS[0]}
  [[ $unrolled_rc == 0 ]] || probe_rc=$unrolled_rc
fi
if [[ ,$STAGES, == *,bench,* ]]; then
  read -ra bench_args <<<"${BENCH_ARGS:-}"
  echo "+ bench_device.py --out $OUT ${BENCH_ARGS:-}(limit ${BENCH_LIMIT} s)"
  timeout -k 10 "$BENCH_LIMIT" "$PY" experiments/benchmarks/bench_device.py --out "$OUT" \
    --budget_s "$((BENCH_LIMIT - 60))" ${bench_args[@]+"${bench_args[@]}"} 2>&1 \
    | tee "$OUT/bench_device.log"
  bench_rc=${PIPESTATUS[0]}
fi

{
  echo "pytest -m device: exit $tests_rc (124 = stopped at ${TEST_LIMIT} s)"
  [[ -f $OUT/pytest_device.txt ]] && grep -E "passed|failed|error" "$OUT/pytest_device.txt" | tail -n 1
  echo "bench_device.py: exit $bench_rc (124 = stopped at ${BENCH_LIMIT} s)"
  echo "probe (rollout_7b with XLA_FLAGS=$PROBE_FLAGS; rollout_7b_unrolled): exit $probe_rc"
} | tee "$OUT/summary.txt"
for rc in "$tests_rc" "$bench_rc" "$probe_rc"; do
  [[ $rc == skipped || $rc == 0 ]] || exit 1
done
exit 0
