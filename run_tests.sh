#!/usr/bin/env bash
# The test suite, from nothing: set up .venv with torch_xla (XLA tests run on its CPU backend)
# and run pytest. Extra arguments go to pytest. Usage: bash run_tests.sh
set -euo pipefail
cd "$(dirname "$0")"
bash setup_env.sh "xla,plots,tensorboard,test"
# pytest exits 5 when it collected no test; that is a failure here like any other non-zero code.
exec .venv/bin/python -m pytest tests "$@"
