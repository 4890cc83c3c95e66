#!/usr/bin/env bash
# The README's first command: install what is missing, start the local stack, run the whole pipeline on
# generated multi-channel traffic and show live indicators and alerts. Extra arguments go to `touchpoint demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec touchpoint demo "$@"
