#!/usr/bin/env bash
# Create (once) a virtualenv and install the project into it with the given extras, plus any
# extra requirements (a torch version to test against). Used by run_demo.sh and run_tests.sh; safe
# to run again: an installed venv is only updated when pyproject.toml or the arguments change.
# Usage: bash setup_env.sh [EXTRAS [VENV_DIR [REQUIREMENT ...]]]
#        bash setup_env.sh "plots"                                   # .venv, the demo's
#        bash setup_env.sh "xla,plots,tensorboard,test"              # .venv, the full test suite
#        bash setup_env.sh "plots,tensorboard,test" .venv-torch-latest "torch==2.14.1"
# Python 3.11-3.13 (the first found of python3.11, python3.12, python3.13, python3): every
# dependency has wheels for 3.11 and 3.12; on 3.13 flashlight-text and editdistance have none,
# so pip builds them (a C++ compiler and CMake needed).
set -euo pipefail
cd "$(dirname "$0")"
extras="${1:-plots}"
venv="${2:-.venv}"
requirements=("${@:3}")

python_bin=""
for candidate in python3.11 python3.12 python3.13 python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 \
        && "$candidate" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 13))'; then
        python_bin="$candidate"
        break
    fi
done
if [ -z "$python_bin" ]; then
    echo "setup_env.sh: Python 3.11, 3.12 or 3.13 is required (none found on PATH)" >&2
    exit 1
fi

if [ ! -x "$venv/bin/python" ]; then
    "$python_bin" -m venv "$venv"
fi
key="$(printf '%s\n' "$extras" "${requirements[@]}" | cat - pyproject.toml | sha1sum | cut -c1-12)"
stamp="$venv/.installed-$key"
if [ ! -f "$stamp" ]; then
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet -e ".[$extras]" "${requirements[@]}"
    touch "$stamp"
fi
