#!/usr/bin/env bash
# The two set-up commands of the README:
#   bash scripts/run.sh demo [--output-dir DIR]   make the demo dataset, train, evaluate, predict, draw
#   bash scripts/run.sh test [pytest args]        run the test suite
# Each creates (or reuses) the virtual environment .venv and installs tinyseg with what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TINYSEG_VENV:-.venv}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.tinyseg-installed"
wanted=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
  echo "installing tinyseg and its dependencies into $VENV (torch is large: the first time takes minutes)"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e ".[test]"
  echo "$wanted" > "$stamp"
fi

verb=${1:-}
shift || true
case "$verb" in
  demo) exec "$VENV/bin/tinyseg" demo "$@" ;;
  test) exec "$VENV/bin/python" -m pytest "$@" ;;
  *) echo "usage: bash scripts/run.sh demo|test [args]" >&2; exit 2 ;;
esac
