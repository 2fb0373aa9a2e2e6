#!/usr/bin/env bash
# Every accelerator check of the project in one run, for a machine with a GPU (or TPU) whose
# Python already has JAX for it, most wanted first: what it finds; training compiled with and
# without autotuning; reproduce timed with 1 seed and with 3 seeds in fresh workdirs (issue 12's
# targets: <= 30 s and <= 60 s, compilation included; on an H100 on 2026-11-26: 21 s and 25 s,
# from 38 s and 45 s that morning), with 1 seed without compiling studies 2 and 4's
# programs ahead (--compile_ahead=false, to weigh it), then with 1 seed again on the first run's
# compiled programs (--fresh keeps the workdir's compilation cache); the test suite; the benchmark;
# study 5. Every reproduce logs each compilation (JAX_LOG_COMPILES), summed per program in
# compilations_*.txt: on a GPU compiling, not computing, takes most of the time.
#
#   MNIST_DIR=<folder of the four MNIST .gz files> OUT=<folder> bash experiments/device_check.sh
#
# SHAKESPEARE_DIR (default: ../shared/data/tinyshakespeare beside the clone) holds Tiny
# Shakespeare's input.txt, which study 7's tests need.
# PYTHON picks the interpreter (default python3); it needs the packages of requirements.txt.
# WHEELS may name a folder of wheels (e.g. tensorflow-datasets' and its dependencies', from
# `pip download`) installed first, without network, where the package is missing: without
# tensorflow-datasets the 8 tests of its download path fail. BUDGET (default 560 s) bounds the
# whole run: each step has its own time limit, the last ones get what is left, and the steps go
# on after a failure. Logs and results go to $OUT, packed after every step into
# $OUT/device_check.tgz (so a run cut short still leaves them); each test failure is written to
# tests_failures.log as it happens; a summary table is printed last. STEPS (default: all) picks
# some of: autotune reproduce not_ahead warm tests benchmark methods cusparse (e.g.
# STEPS="reproduce tests" in one device call and STEPS="reproduce cusparse" in the next, when one
# call cannot hold all); `autotune` weighs training compiled with and without XLA's autotuning;
# `reproduce` runs 1 seed and 3 seeds, `not_ahead` 1 seed with --compile_ahead=false, `warm` the
# 1-seed rerun on the compiled programs. TEST_WORKERS (default 8) is pytest-xdist's -n, TESTS the test
# files to run (default all), and TESTS_LIMIT (default 330 s) caps their step. `cusparse` times
# study 4's weight-sparse forms (BCSR, BCOO; batch 100) on the 1-seed run's nets twice: with JAX's
# generic sparse products, and with them lowered to cuSPARSE (JAX_BCOO_CUSPARSE_LOWERING, off by
# default in JAX), in weight_sparse_{generic,cusparse}.csv.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
out="${OUT:-/tmp/device_check}"
budget="${BUDGET:-560}"
work="$(mktemp -d /tmp/device_check_work.XXXXXX)"
logs="$work/logs"
mkdir -p "$out" "$logs"
export PRUNE_JAX_MNIST_DIR="${MNIST_DIR:?set MNIST_DIR to the folder of the four MNIST files}"
export PRUNE_JAX_SHAKESPEARE_DIR="${SHAKESPEARE_DIR:-$root/../shared/data/tinyshakespeare}"
export PRUNE_JAX_REQUIRE_MNIST=1 PRUNE_JAX_REQUIRE_SHAKESPEARE=1 PYTHONUNBUFFERED=1
summary=()
steps="${STEPS:-autotune reproduce not_ahead warm tests benchmark methods cusparse}"
want() { [[ " $steps " == *" $1 "* ]]; }

pack() {  # the logs and results so far, as one file in $out
  tar -czf "$out/device_check.tgz.tmp" -C "$work" logs && \
      mv "$out/device_check.tgz.tmp" "$out/device_check.tgz"
}

left() { echo $((budget - SECONDS)); }

step() {  # step NAME SECONDS COMMAND...: runs COMMAND with a time limit (SIGINT, then SIGKILL),
  local name=$1 limit=$2  # at most what is left of the budget
  shift 2
  (( limit > $(left) )) && limit=$(left)
  if ((limit < 10)); then
    summary+=("$(printf '%-20s skipped: %d s of the budget left' "$name" "$(left)")")
    return
  fi
  local start=$SECONDS
  timeout -s INT -k 15 "$limit" "$@" >"$logs/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-20s rc=%-4s %5d s (limit %d s)' "$name" "$rc" $((SECONDS - start)) \
      "$limit")")
  pack
}

step environment 60 "$python" -c "
import importlib, jax, jax.numpy as jnp, numpy as np
print('jax', jax.__version__, 'backend', jax.default_backend(), 'devices', jax.devices())
for name in ('jaxlib', 'flax', 'optax', 'absl', 'matplotlib', 'numpy', 'pytest', 'hypothesis',
             'xdist'):
  try:
    module = importlib.import_module(name)
    print(name, getattr(module, '__version__', 'present'))
  except ImportError as e:
    print('MISSING', name, e)
a = np.random.default_rng(0).normal(size=(1000, 1000)).astype(np.float32)
exact = a.astype(np.float64) @ a.astype(np.float64)
for precision in ('default', 'highest'):
  with jax.default_matmul_precision(precision):
    got = np.asarray(jax.jit(jnp.matmul)(a, a))
  print(f'float32 matmul at {precision!r}: largest error {np.abs(got - exact).max():.2e} '
        f'(entries of scale {np.abs(exact).max():.0f})')
"
nvidia-smi >"$logs/nvidia-smi.txt" 2>&1 || true
if [[ -n "${WHEELS:-}" ]]; then  # the wheels of packages this Python lacks, without network
  step wheels 60 "$python" -c "
import glob, importlib.metadata as md, subprocess, sys
missing = []
for wheel in sorted(glob.glob('$WHEELS/*.whl')):
  try:
    md.version(wheel.split('/')[-1].split('-')[0].replace('_', '-'))
  except md.PackageNotFoundError:
    missing.append(wheel)
print('installing', missing or 'nothing: every package is present')
sys.exit(missing and subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps', '--no-index',
                         *missing]).returncode)
"
fi

# Training compiled with and without XLA's autotuning (train.autotunes): each program's compile
# seconds and steps/s, for the seed's net (2000 steps, as the base nets) and a stack of 10 (500
# steps, as study 2), after a warm-up that pays the first compilation's start-up costs.
want autotune && step autotune 90 "$python" -c "
import jax, jax.numpy as jnp, numpy as np
from prune_jax import data, train
from prune_jax.models import MLP, init_mlp
mnist = data.on_device(data.load_mnist('$PRUNE_JAX_MNIST_DIR'))
x, y = mnist.train_images, mnist.train_labels
small = MLP(hidden=(8,))
train.train(small, init_mlp(jax.random.key(0), small), x, y, key=jax.random.key(0), steps=10,
            log_every=0)
model = MLP()
one = init_mlp(jax.random.key(0), model)
stack = jax.tree.map(lambda a: jnp.stack([a] * 10), one)
for autotune in (False, True):
  _, s = train.train(model, one, x, y, key=jax.random.key(1), steps=2000, log_every=0,
                     autotune=autotune)
  print(f'autotune={autotune}: 1 net, 2000 steps: compile {s.compile_seconds:.2f} s, '
        f'{s.steps_per_second:.0f} steps/s ({s.seconds:.3f} s)')
  _, s = train.train_many(model, stack, None, x, y, key=jax.random.key(1), steps=500,
                          log_every=0, autotune=autotune)
  print(f'autotune={autotune}: 10 nets, 500 steps: compile {s.compile_seconds:.2f} s, '
        f'{s.steps_per_second:.0f} steps/s ({s.seconds:.3f} s)')
"

compilations() {  # the seconds each program took to compile in a reproduce log, largest first
  "$python" - "$1" >"$2" 2>&1 <<'PY'
import collections, re, sys
programs = collections.defaultdict(lambda: [0, 0.0])
for line in open(sys.argv[1], errors="replace"):
  found = re.search(r"Finished XLA compilation of (\S+) in ([\d.]+) sec", line)
  if found:
    programs[found[1]][0] += 1
    programs[found[1]][1] += float(found[2])
for name, (count, seconds) in sorted(programs.items(), key=lambda p: -p[1][1]):
  print(f"{seconds:8.2f} s {count:4d} x {name}")
PY
}

reproduce() {  # reproduce NAME LIMIT ARGS...: timed, every compilation logged
  local name=$1 limit=$2
  shift 2
  step "$name" "$limit" env JAX_LOG_COMPILES=1 "$python" -m experiments.reproduce "$@"
  compilations "$logs/$name.log" "$logs/compilations_$name.txt"
}
if want reproduce || want cusparse; then
  reproduce reproduce_1_seed 100 --workdir="$work/work1" --fresh
  cp "$work/work1/REPORT.md" "$logs/REPORT_1_seed.md" 2>/dev/null
fi
if want not_ahead; then
  # The same without compiling studies 2 and 4's programs ahead (on by default on an accelerator).
  reproduce reproduce_1_seed_not_ahead 100 --workdir="$work/work1b" --fresh --compile_ahead=false
  cp "$work/work1b/REPORT.md" "$logs/REPORT_1_seed_not_ahead.md" 2>/dev/null
fi
if want reproduce; then
  reproduce reproduce_3_seeds 120 --workdir="$work/work3" --seeds=0,1,2 --fresh
  cp "$work/work3/REPORT.md" "$logs/REPORT_3_seeds.md" 2>/dev/null
fi
if want warm && [[ -d "$work/work1" ]]; then
  reproduce reproduce_1_seed_warm 60 --workdir="$work/work1" --fresh
  cp "$work/work1/REPORT.md" "$logs/REPORT_1_seed_warm.md" 2>/dev/null
fi
if want cusparse; then  # the same nets and flags (the units are loaded), only the lowering differs
  for lowering in generic cusparse; do
    cp -r "$work/work1" "$work/sparse_$lowering"
    step "sparse_$lowering" 60 env JAX_BCOO_CUSPARSE_LOWERING="$([[ $lowering == cusparse ]] \
        && echo true || echo false)" "$python" -m experiments.shrink \
        --workdir="$work/sparse_$lowering" --eval_batches=100 --weight_sparse_batches=100 \
        --weight_sparse_formats=bcsr,bcoo --timing_runs=9
    cp "$work/sparse_$lowering/shrink/weight_sparse.csv" "$logs/weight_sparse_$lowering.csv" \
        2>/dev/null
  done
fi
if want tests; then
  reserve=10  # seconds kept for the steps after the tests, and the summary
  { want benchmark || want methods; } && reserve=60
  tests_limit=$(($(left) - reserve))
  ((tests_limit > ${TESTS_LIMIT:-330})) && tests_limit=${TESTS_LIMIT:-330}
  # shellcheck disable=SC2086 (TESTS: the test files or node ids to run, default all)
  step tests "$tests_limit" env PRUNE_JAX_FAILURE_LOG="$logs/tests_failures.log" "$python" \
      -m pytest -n "${TEST_WORKERS:-8}" -v -rfE --tb=short -p no:cacheprovider --durations=30 \
      ${TESTS:-}
fi
want benchmark && step benchmark 40 "$python" -m experiments.benchmark \
    --json_out="$logs/benchmark.json"
if want methods && [[ -d "$work/work3" ]]; then
  # Study 5 (every method's levels as one stack per method), on the 3-seed run's base nets.
  step methods_3_seeds $(($(left) - 5)) "$python" -m experiments.methods \
      --workdir="$work/work3" --seeds=0,1,2
  for kind in weight unit; do
    cp "$work/work3/methods_$kind/table.csv" "$logs/methods_$kind.csv" 2>/dev/null
  done
fi
{
  echo "device check ($(date -u +%FT%TZ)), ${SECONDS} s:"
  printf '%s\n' "${summary[@]}"
  for f in "$logs"/REPORT_*.md; do  # each run's phases, and what of each was compilation
    [[ -f "$f" ]] && { echo "$(basename "$f"):"; grep -h "Wall time\|^| " "$f" | head -9; }
  done
  grep -h "^=== " "$logs/tests_failures.log" 2>/dev/null
  tail -n 3 "$logs/tests.log" 2>/dev/null
} | tee "$logs/summary.txt"
pack
cp "$logs/summary.txt" "$out/summary.txt"
