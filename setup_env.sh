#!/usr/bin/env bash
# Create (once) the project's virtualenv in .venv and install the project with the given extras.
# Used by run_demo.sh and run_tests.sh; safe to run again: an installed venv is only updated.
# Usage: bash setup_env.sh "plots"   (or "xla,plots,tensorboard,test")
set -euo pipefail
cd "$(dirname "$0")"
extras="${1:-plots}"

python_bin=""
for candidate in python3.11 python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 \
        && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
        python_bin="$candidate"
        break
    fi
done
if [ -z "$python_bin" ]; then
    echo "setup_env.sh: Python 3.11 is required (python3.11 not found on PATH)" >&2
    exit 1
fi

if [ ! -x .venv/bin/python ]; then
    "$python_bin" -m venv .venv
fi
stamp=".venv/.installed-$(echo "$extras" | tr ',' '-')-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e ".[$extras]"
    touch "$stamp"
fi
