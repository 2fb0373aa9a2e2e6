#!/usr/bin/env bash
# Every accelerator check of the project in one run, for a machine with a GPU (or TPU) whose
# Python already has JAX for it: what it finds, the test suite, the benchmark, and reproduce
# timed with 1 and 3 seeds (issue 12's targets: <= 30 s and <= 60 s, compilation included), and
# study 5 with 3 seeds.
#
#   MNIST_DIR=<folder of the four MNIST .gz files> OUT=<folder> bash experiments/device_check.sh
#
# PYTHON picks the interpreter (default python3); it needs the packages of requirements.txt but
# tensorflow-datasets (MNIST is read from MNIST_DIR). Each step has its own time limit and the
# steps go on after a failure; logs go to $OUT, a summary table is printed last.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
out="${OUT:-/tmp/device_check}"
mkdir -p "$out"
export PRUNE_JAX_MNIST_DIR="${MNIST_DIR:?set MNIST_DIR to the folder of the four MNIST files}"
export PRUNE_JAX_REQUIRE_MNIST=1
summary=()

step() {  # step NAME SECONDS COMMAND...: runs COMMAND with a time limit, logs to $out/NAME.log
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-24s rc=%-4s %5d s' "$name" "$rc" $((SECONDS - start)))")
}

step environment 120 "$python" -c "
import importlib, jax
print('jax', jax.__version__, 'devices', jax.devices())
for name in ('flax', 'optax', 'absl', 'matplotlib', 'numpy', 'pytest', 'hypothesis'):
  try:
    print(name, importlib.import_module(name).__version__ if name != 'absl' else 'ok')
  except ImportError as e:
    print('MISSING', name, e)
"
nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || true
step benchmark 240 "$python" -m experiments.benchmark
step reproduce_1_seed 300 "$python" -m experiments.reproduce --workdir="$out/work1" --fresh
step reproduce_3_seeds 300 "$python" -m experiments.reproduce --workdir="$out/work3" \
    --seeds=0,1,2 --fresh
# Study 5 (every method's levels as one stack per method), on the 3-seed run's base nets.
step methods_3_seeds 300 "$python" -m experiments.methods --workdir="$out/work3" --seeds=0,1,2
step tests 600 "$python" -m pytest -q -x -p no:cacheprovider
cp "$out/work1/REPORT.md" "$out/REPORT_1_seed.md" 2>/dev/null
cp "$out/work3/REPORT.md" "$out/REPORT_3_seeds.md" 2>/dev/null
cp "$out/work3/methods_weight/table.csv" "$out/methods_weight.csv" 2>/dev/null
cp "$out/work3/methods_unit/table.csv" "$out/methods_unit.csv" 2>/dev/null

echo "device check ($(date -u +%FT%TZ)), logs in $out:"
printf '%s\n' "${summary[@]}"
grep -h "Wall time" "$out"/REPORT_*.md 2>/dev/null
tail -n 3 "$out/tests.log" 2>/dev/null
