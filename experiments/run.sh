#!/usr/bin/env bash
# Runs a study or the tests in the project's own virtual environment, creating it on first use.
#
#   bash experiments/run.sh reproduce [--flags]   # python -m experiments.reproduce
#   bash experiments/run.sh sweep --helpfull      # any experiments.<name>
#   bash experiments/run.sh test [pytest args]    # python -m pytest -n auto --maxprocesses=4
#
# The environment is .venv/ beside this folder (PRUNE_JAX_VENV to put it elsewhere). It is
# (re)built from requirements.txt whenever that file changes.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${PRUNE_JAX_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
want="$(sha256sum "$root/requirements.txt" | cut -d' ' -f1)"
if [[ ! -x "$venv/bin/python" || "$(cat "$venv/.requirements.sha256" 2>/dev/null)" != "$want" ]]; then
  echo "run.sh: setting up $venv from requirements.txt (first run only, about a minute)" >&2
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$root/requirements.txt"
  echo "$want" > "$venv/.requirements.sha256"
fi
cd "$root"
what="${1:-reproduce}"
shift || true
if [[ "$what" == "test" ]]; then
  # One pytest-xdist worker per core, at most 4 (each is a JAX process using every core); a later
  # -n in the arguments wins, e.g. -n 0 for one process.
  exec "$venv/bin/python" -m pytest -n auto --maxprocesses=4 "$@"
fi
exec "$venv/bin/python" -m "experiments.$what" "$@"
