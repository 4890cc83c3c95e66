#!/usr/bin/env bash
# The README's second command: install, start the local stack, run every test, stop what it started.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh tests/unit -x`). The whole suite runs on Apache Kafka;
# `bash scripts/test.sh --tansu-smoke` runs the tests marked smoke on the Tansu fallback broker instead, on a port
# and state directory of its own, so a running Kafka stack is neither mistaken for it nor stopped by it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--tansu-smoke" ]; then
    shift
    export TOUCHPOINT_STACK__BROKER=tansu TOUCHPOINT_KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:19192 \
        TOUCHPOINT_STACK__STATE_DIR="${TOUCHPOINT_STACK__STATE_DIR:-$PWD/.touchpoint}/tansu-smoke"
    set -- -m smoke tests/integration "$@"
else
    export TOUCHPOINT_STACK__BROKER="${TOUCHPOINT_STACK__BROKER:-kafka}"
fi
bash scripts/setup.sh
started_here=0
if ! touchpoint stack status >/dev/null 2>&1; then
    started_here=1
fi
touchpoint stack up
stop_stack() { if [ "$started_here" = 1 ]; then touchpoint stack down >/dev/null || true; fi; }
trap stop_stack EXIT
ruff check .
python3 -m mypy
set +e
python3 -m pytest "$@"
status=$?
set -e
if [ "$status" = 5 ]; then
    echo "test.sh: pytest collected no tests; that is a failure here" >&2
    status=1
fi
exit "$status"
