#!/usr/bin/env bash
# The README's second command: install, start the local stack, run every test, stop what it started.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh tests/unit -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
started_here=0
if ! touchpoint stack status >/dev/null 2>&1; then
    started_here=1
fi
touchpoint stack up
stop_stack() { if [ "$started_here" = 1 ]; then touchpoint stack down >/dev/null || true; fi; }
trap stop_stack EXIT
ruff check .
set +e
python3 -m pytest "$@"
status=$?
set -e
if [ "$status" = 5 ]; then
    echo "test.sh: pytest collected no tests; that is a failure here" >&2
    status=1
fi
exit "$status"
