#!/usr/bin/env bash
# The test suite, from nothing, on the two stacks the project supports. Extra arguments go to pytest.
# 1. .venv: torch 2.9 with torch_xla 2.9 (the XLA extras), the whole suite; XLA tests run on
#    torch_xla's CPU backend.
# 2. .venv-torch-latest: the newest torch the core dependencies admit, without torch_xla; the same
#    tests, those marked requires_xla skip. It is installed while the first run's tests run.
# Usage: bash run_tests.sh [PYTEST_ARGS ...]
set -euo pipefail
cd "$(dirname "$0")"
TORCH_LATEST="torch==2.14.1"  # the upper end of pyproject.toml's torch range: move both together
status=0
bash setup_env.sh "xla,plots,tensorboard,test"
setup_log="$(mktemp)"
bash setup_env.sh "plots,tensorboard,test" .venv-torch-latest "$TORCH_LATEST" >"$setup_log" 2>&1 &
setup_pid=$!
# pytest exits 5 when it collected no test; that is a failure here like any other non-zero code.
.venv/bin/python -m pytest tests "$@" || status=$?
if ! wait "$setup_pid"; then
    cat "$setup_log" >&2
    echo "run_tests.sh: setting up .venv-torch-latest ($TORCH_LATEST) failed" >&2
    exit 1
fi
rm -f "$setup_log"
echo "run_tests.sh: the CPU tests on $TORCH_LATEST (.venv-torch-latest)"
.venv-torch-latest/bin/python -m pytest tests "$@" || status=$?
exit "$status"
