"""One settings object for every command: defaults < TOML file < environment (TOUCHPOINT_*)."""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from pipeline.core.identity import DAY_MS, KINDS, IdentityConfig
from pipeline.core.journeys import DEFAULT_EFFORT_WEIGHTS, EFFORT_COMPONENTS, JourneyConfig
from pipeline.core.validate import BLANK_IDENTIFIERS

if TYPE_CHECKING:
    from pipeline.core.processor import WindowConfig

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# A checkout reads schemas/ at the top; an installed package carries the same files as pipeline/schemas.
SCHEMAS_DIR = PROJECT_ROOT / "schemas"
if not (SCHEMAS_DIR / "registry.json").exists():
    SCHEMAS_DIR = Path(__file__).resolve().parent / "schemas"


class KafkaSettings(BaseModel):
    bootstrap_servers: str = "127.0.0.1:19092"
    topic: str = "touchpoints"
    dead_letter_topic: str = "touchpoints.deadletter"
    partitions: int = Field(4, ge=1, description="Partitions created by `touchpoint init` for the topic.")
    replication_factor: int = 1
    consumer_group: str = "touchpoint-pipeline"
    session_timeout_s: float = Field(10.0, gt=0, description="A worker silent this long leaves the group.")
    max_message_bytes: int = Field(1_048_576, ge=65_536, description="Largest message the producers send and the "
                                   "touchpoint topic takes (init sets its max.message.bytes); a dead letter over it "
                                   "goes without its bytes.")
    retention_hours: float = Field(168.0, gt=0, description="How long the broker keeps touchpoints (replay horizon).")
    dead_letter_retention_days: float = Field(30.0, gt=0, description="How long the broker keeps dead letters.")

    @field_validator("bootstrap_servers")
    @classmethod
    def _host_ports(cls, value: str) -> str:
        for address in value.split(","):
            host, _, port = address.strip().rpartition(":")
            if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise ValueError(f"{address.strip()!r} is not host:port with a port from 1 to 65535 "
                                 "(comma-separated for several brokers)")
        return value


class RegistrySettings(BaseModel):
    # file:// for the local stack (a manifest in schemas/), http(s):// for a Confluent-compatible registry.
    url: str = Field(f"file://{SCHEMAS_DIR / 'registry.json'}", pattern=r"^(file|https?)://")
    subject: str = "touchpoints-value"


class ClickHouseSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(19000, ge=1, le=65535, description="Native protocol port.")
    http_port: int = Field(18123, ge=1, le=65535)
    database: str = "touchpoint"
    user: str = "default"
    password: str = ""
    cluster: str = Field("", pattern=r"^[A-Za-z0-9_]*$", description=(
        "A cluster of the servers' remote_servers: migrations create Replicated*MergeTree tables <table>_local "
        "ON CLUSTER and Distributed tables under the usual names over them (docs/clickhouse.md); empty = one "
        "server."))
    replica_path: str = Field("/clickhouse/tables/{shard}/{database}/{table}", description=(
        "ZooKeeper path of each replicated table ({shard} and {replica} are the servers' macros; {database} and "
        "{table} are filled in by the migrations)."))
    touchpoints_ttl_days: int = Field(0, ge=0, description=(
        "Raw touchpoints older than this (event time) are deleted by the server; 0 = kept. Set when the table is "
        "created, on servers with TTL (19.6+; not 18.16)."))
    dead_letter_replays_ttl_days: int = Field(30, ge=0, description=(
        "Records of replayed dead letters are kept this long (the dead-letter topic's retention); 0 = kept. Set "
        "when the table is created, on servers with TTL."))


def _default_apdex_t_ms() -> dict[str, int]:
    from pipeline.core.indicators import DEFAULT_APDEX_T_MS

    return dict(DEFAULT_APDEX_T_MS)


class WindowSettings(BaseModel):
    size_s: int = Field(60, ge=1, description="Tumbling window (pane) length in event time.")
    allowed_lateness_s: int = Field(
        10, ge=0, description="Grace: watermark = max event time seen - this; a window closes when it passes."
    )
    max_future_s: int = Field(300, ge=0, description="Events further in the future than this are dead-lettered.")
    idle_close_s: float = Field(
        30.0, ge=0, description="Wall-clock seconds after which an idle partition's open windows are closed."
    )
    hopping_size_s: int = Field(900, ge=1, description="Hopping window length (a whole number of panes), every pane.")
    session_gap_s: int = Field(1800, ge=1, description="A person's session ends after this much inactivity.")
    session_max_s: int = Field(
        14_400, ge=1, description="Sessions are cut at every multiple of this in event time (a whole number of panes)."
    )
    apdex_t_ms: dict[str, int] = Field(
        default_factory=_default_apdex_t_ms, description="Apdex T per flow, milliseconds (JSON object in env)."
    )
    apdex_default_t_ms: int = Field(500, ge=1, description="Apdex T of flows not in apdex_t_ms.")

    def core(self) -> WindowConfig:
        from pipeline.core.processor import WindowConfig

        return WindowConfig(self.size_s * 1000, self.allowed_lateness_s * 1000, self.max_future_s * 1000,
                            int(self.idle_close_s * 1000), hopping_ms=self.hopping_size_s * 1000,
                            session_gap_ms=self.session_gap_s * 1000, session_max_ms=self.session_max_s * 1000,
                            apdex_t_ms=dict(self.apdex_t_ms), apdex_default_t_ms=self.apdex_default_t_ms)


class JourneySettings(BaseModel):
    enabled: bool = Field(True, description="Cut journeys and keep person profiles (tables journeys, person_profiles).")
    gap_s: int = Field(1800, ge=1, description="A journey ends after this much inactivity...")
    case_gap_s: int = Field(86_400, ge=1, description="...or this much while it carries a journey_id (a case, a "
                            "booking, an order) that a later touchpoint may share.")
    effort_weights: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_EFFORT_WEIGHTS),
        description="Weight of each effort index component (docs/indicators.md, Journey effort index).")

    @field_validator("effort_weights")
    @classmethod
    def _known_components(cls, weights: dict[str, float]) -> dict[str, float]:
        known = {c.id for c in EFFORT_COMPONENTS}
        unknown = sorted(set(weights) - known)
        if unknown:
            raise ValueError(f"unknown effort components {unknown}; known: {sorted(known)}")
        if any(w < 0 for w in weights.values()) or not sum(weights.values()) > 0:
            raise ValueError("effort weights must be >= 0 and not all 0")
        return weights

    def core(self) -> JourneyConfig | None:
        if not self.enabled:
            return None
        return JourneyConfig(self.gap_s * 1000, self.case_gap_s * 1000, dict(self.effort_weights))


class BatchSettings(BaseModel):
    max_events: int = Field(20_000, ge=1, description="Flush to ClickHouse once this many events are buffered.")
    max_wait_s: float = Field(1.0, gt=0, description="...or once the oldest buffered event waited this long.")
    retry_max_s: float = Field(30.0, gt=0, description="A failed store write is retried with a backoff doubling "
                               "from 0.5 s up to this; nothing is committed meanwhile.")
    snapshot_interval_s: float = Field(
        5.0, gt=0, description="Checkpoint each partition's open windows (sessions, open panes) at most this often; "
                               "a restart replays only the records read since its last checkpoint.")


class IdentitySettings(BaseModel):
    enabled: bool = Field(True, description="Resolve persons and roles through the identity graph.")
    table: str = Field("identity", description="Names the identity log, a compacted topic of identity operations: "
                                               "<consumer group>-<table>-changelog.")
    store: str = Field("memory://", pattern="^(memory|rocksdb)://",
                       description="Where a worker keeps the identity graph: memory://, or rocksdb:// (on disk under "
                                   "the state dir, with a bounded cache; a restart reads only the log's tail).")
    unique_kinds: list[str] = Field(["customer_id", "user_id"],
                                    description="Identifier kinds a person holds one value of: never merged.")
    extra_blocked_values: list[str] = Field(["nil", "n/a", "guest"],
                                            description="Values (besides blanks) that never identify anyone.")
    daily_limits: dict[str, int] = Field({"anonymous_id": 10},
                                         description="At most this many identifiers of a kind join a person a day.")
    max_values: dict[str, int] = Field(
        {"email_sha256": 1, "phone_sha256": 1, "helpdesk_requester_id": 1},
        description="At most this many distinct values of a kind per person: a merge that would exceed it is "
                    "refused and recorded in identity_audit (refuse_max_values). Raise it to let, say, two email "
                    "hashes join one person.")
    graph_cache_entries: int = Field(100_000, ge=1_000, description="Entries of each on-disk graph map cached in "
                                                                    "memory (store = rocksdb://).")
    habitual_purchases: int = Field(2, ge=2, description="Purchases within habitual_days that make a habit.")
    habitual_days: float = Field(90, description="The period those purchases must fall within.")
    lapse_days: float = Field(180, description="No purchase for this long: a former customer.")
    cancelled_days: float = Field(30, description="A cancelled subscription this long ago: a former customer.")
    restate_horizon_s: float = Field(
        0, ge=0, le=90 * 86_400,
        description="Late identify: when a merge joins an identifier with earlier touchpoints to a person, its rows "
                    "this far before the merge are restated (person, role and the role-split indicator cells); "
                    "older ones are recorded in identity_audit (not_restated) and kept. 0: off (merges restate "
                    "nothing). An unmerge restates rows since the merge, and this far before it. At most 90 days.")

    @field_validator("unique_kinds", "daily_limits", "max_values")
    @classmethod
    def _known_kinds(cls, kinds: list[str] | dict[str, int]) -> list[str] | dict[str, int]:
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown identifier kinds {unknown}; known: {list(KINDS)}")
        return kinds

    @field_validator("max_values")
    @classmethod
    def _caps_of_one_or_more(cls, caps: dict[str, int], info: ValidationInfo) -> dict[str, int]:
        if any(n < 1 for n in caps.values()):
            raise ValueError("each kind's cap must be 1 or more (leave a kind out to not cap it)")
        unique = sorted(set(caps) & set(info.data.get("unique_kinds", ())))
        if unique:  # a unique kind already holds one value, refused as a conflict
            raise ValueError(f"{unique} are unique_kinds already (one value per person); cap other kinds only")
        return caps

    def core(self) -> IdentityConfig:
        return IdentityConfig(
            unique_kinds=frozenset(self.unique_kinds),
            blocked_values=BLANK_IDENTIFIERS | {v.strip().lower() for v in self.extra_blocked_values},
            daily_limits=dict(self.daily_limits), max_values=dict(self.max_values),
            habitual_purchases=self.habitual_purchases,
            habitual_ms=int(self.habitual_days * DAY_MS), lapse_ms=int(self.lapse_days * DAY_MS),
            cancelled_ms=int(self.cancelled_days * DAY_MS),
            restate_horizon_ms=int(self.restate_horizon_s * 1000),
        )


def default_alerting_rules() -> list[dict[str, Any]]:
    """The alerter's rules (pipeline/core/alerting.py reads them; docs/alerting.md explains each field)."""
    ux = {"task_success_rate": [0.8, 0.9], "error_rate": [0.1, 0.05], "apdex": [0.65, 0.75],
          "intermittency": [0.1, 0.03]}
    cx = {"csat": [0.6, 0.75], "nps": [0.0, 20.0], "fcr": [0.7, 0.8], "escalation_rate": [0.15, 0.08]}
    return [
        {"name": "ux_error_rate_high", "kind": "threshold", "indicator": "error_rate", "comparison": "above",
         "threshold": 0.15, "recovery_threshold": 0.10, "min_count": 20},
        {"name": "cx_csat_low", "kind": "threshold", "indicator": "csat", "comparison": "below", "threshold": 0.6,
         "recovery_threshold": 0.7, "min_count": 10, "severity": "critical"},
        {"name": "ux_task_success_low", "kind": "wilson", "indicator": "task_success_rate", "comparison": "below",
         "threshold": 0.8, "recovery_threshold": 0.85, "confidence": 0.95, "min_count": 30},
        {"name": "ux_error_rate_unusual", "kind": "seasonal", "indicator": "error_rate", "comparison": "above",
         "window_kind": "15m", "weeks": 4, "min_weeks": 3, "z": 3.5, "min_mad": 0.005, "min_count": 50},
        {"name": "ux_bad_cx_good", "kind": "divergence", "divergence": "ux_bad_cx_good", "ux": ux, "cx": cx,
         "min_signals": 2, "min_count": 20, "severity": "warning"},
        {"name": "ux_good_cx_bad", "kind": "divergence", "divergence": "ux_good_cx_bad", "ux": ux, "cx": cx,
         "min_signals": 2, "min_count": 20, "severity": "critical"},
        {"name": "channel_silent", "kind": "no_data", "no_data_windows": 5, "severity": "warning"},
    ]


class CaseSettings(BaseModel):
    enabled: bool = Field(True, description="Open follow-up cases for detractor customers.")
    sla_hours: float = Field(48.0, gt=0, description="A case not closed this long after it opened escalates.")
    queues: dict[str, str] = Field(
        {"nps_detractor": "cx-follow-up", "csat_detractor": "cx-follow-up",
         "escalated_contact": "support-escalations"}, description="Owner queue per reason.")
    reasons: list[str] = Field(["nps_detractor", "csat_detractor", "escalated_contact"],
                               description="Which detractor reasons open cases.")


class AlertingSettings(BaseModel):
    """`touchpoint alerter`: rules, receivers, routes and the engine's timing (docs/alerting.md)."""

    rules: list[dict[str, Any]] = Field(default_factory=default_alerting_rules)
    receivers: list[dict[str, Any]] = Field([{"name": "log", "kind": "log"}],
                                            description="Where notifications go: log or webhook receivers.")
    routes: list[dict[str, Any]] = Field([{"receiver": "log"}],
                                         description="First matching route wins (unless `continue`).")
    topic: str = Field("touchpoint.alerts", description="Kafka topic of alert transitions (Avro).")
    subject: str = Field("touchpoint.alerts-value", description="Registry subject of the transitions' schema.")
    cycle_s: float = Field(0.5, gt=0, description="Seconds between judging cycles (also the grouping wait).")
    lease_ttl_s: float = Field(10.0, gt=0, description="An active alerter silent this long loses its lease.")
    start_lookback_s: int = Field(900, ge=0, description="A first start judges closed windows this far back.")
    max_windows_per_cycle: int = Field(120, ge=1, description="Pane ends judged per cycle at most (catch-up).")
    retry_initial_s: float = Field(1.0, gt=0, description="First delivery retry after this; doubles each time.")
    retry_max_s: float = Field(60.0, gt=0, description="Longest wait between delivery retries.")
    delivery_concurrency: int = Field(4, ge=1, description="Parallel sends per receiver.")
    give_up_after_s: float = Field(86_400.0, gt=0, description="A notification undelivered this long is dropped.")
    case_lookback_s: int = Field(3_600, ge=0, description="A first start reads touchpoints this far back.")
    cases: CaseSettings = CaseSettings()

    @field_validator("rules")
    @classmethod
    def _valid_rules(cls, rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from pipeline.core.alerting import parse_rules

        parse_rules(rules)
        return rules

    @model_validator(mode="after")
    def _valid_routes(self) -> AlertingSettings:
        from pipeline.core.notify import parse_receivers, parse_routes

        parse_routes(self.routes, parse_receivers(self.receivers))
        return self


class ConsoleSettings(BaseModel):
    host: str = Field("127.0.0.1", description="Address the operations console listens on (loopback by default).")
    port: int = Field(8088, ge=0, le=65535, description="Port of the operations console.")
    token: str = Field("", description="Bearer token for the console's actions (acknowledge, silence, resolve, "
                                       "erase); empty = actions refused.")
    overview_minutes: int = Field(15, ge=1, description="Minutes of closed 1-minute windows the overview pools.")
    dead_letters_scanned: int = Field(1000, ge=1, description="The console reads this many newest dead letters.")


class WriteKeySettings(BaseModel):
    id: str = Field(description="Names the key in logs and answers; never the secret itself.")
    sha256: str = Field(pattern="^[0-9a-f]{64}$", description="SHA-256 hex of the key: keys are never stored.")
    revoked: bool = False
    events_per_s: float = Field(2_000.0, gt=0, description="Sustained events per second this key may send.")
    burst: int = Field(10_000, ge=1, description="Events the key may send at once above its rate.")


class TenantSettings(BaseModel):
    name: str = Field(description="The tenant its keys write; events naming another tenant are refused.")
    keys: list[WriteKeySettings] = []
    cors_origins: list[str] = Field([], description="Browser origins allowed to send for this tenant "
                                                    "(scheme://host[:port], or * for any).")


class CollectorSettings(BaseModel):
    host: str = Field("127.0.0.1", description="Listen address of `touchpoint collector` (loopback by default).")
    port: int = Field(8089, ge=0, le=65535, description="Port of `touchpoint collector` (the console has 8088).")
    tenants: list[TenantSettings] = Field([], description="Tenants and their write keys (JSON list in env).")
    max_request_bytes: int = Field(1_048_576, ge=1024, description="Largest body, after gunzip (413 above).")
    max_event_bytes: int = Field(32_768, ge=256, description="Largest touchpoint, Avro-encoded; larger ones are "
                                                            "rejected one by one.")
    max_events_per_request: int = Field(1_000, ge=1, description="Most touchpoints in one request (413 above).")
    ack_timeout_s: float = Field(5.0, gt=0, description="Longest wait for the broker to acknowledge a request's "
                                                        "events before answering 503.")
    max_pending_requests: int = Field(256, ge=1, description="Requests waiting for the broker at once; more wait "
                                                             "up to ack_timeout_s, then get 503 (bounded memory).")
    max_unacked_events: int = Field(50_000, ge=100, description="Events handed to the producer and not yet "
                                                                "acknowledged or failed; more wait, then 503.")
    retry_after_s: int = Field(5, ge=1, description="Retry-After sent with 503.")
    webhook_dirs: list[Path] = Field([], description="Extra folders of webhook mappings (<source>.toml); they "
                                                     "override the shipped ones of the same name.")
    workers: int = Field(1, ge=1, description="Server processes (each with its own producer).")


class StackSettings(BaseModel):
    state_dir: Path = PROJECT_ROOT / ".touchpoint"
    broker: Literal["auto", "kafka", "tansu"] = Field(
        "auto", description="Local broker: kafka (Apache Kafka, KRaft, durable; needs Java 17+ and the jars "
                            "scripts/setup.sh resolves), tansu (pip-only fallback, memory storage), or auto "
                            "(kafka wherever Java 17+ is present, else tansu).")
    java: str = Field("java", description="Java 17+ executable that runs the local Apache Kafka broker.")
    kafka_libs_dir: Path = Field(PROJECT_ROOT / "deploy" / "kafka-local" / "target" / "libs",
                                 description="Apache Kafka's jars, resolved by Maven from deploy/kafka-local/pom.xml.")
    kafka_controller_port: int = Field(0, ge=0, le=65535,
                                       description="KRaft controller port on loopback; 0 = the broker's port + 1.")
    kafka_heap_mb: int = Field(512, ge=128, description="Maximum JVM heap of the local Apache Kafka broker.")
    tansu_sha256: str = "38a00e200dd4ab0abae267e1c39814e3967c633908de889a7c7210290dcd0723"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TOUCHPOINT_", env_nested_delimiter="__", extra="ignore", toml_file=None
    )

    kafka: KafkaSettings = KafkaSettings()
    registry: RegistrySettings = RegistrySettings()
    clickhouse: ClickHouseSettings = ClickHouseSettings()
    window: WindowSettings = WindowSettings()
    batch: BatchSettings = BatchSettings()
    journeys: JourneySettings = JourneySettings()
    identity: IdentitySettings = IdentitySettings()
    alerting: AlertingSettings = AlertingSettings()
    stack: StackSettings = StackSettings()
    console: ConsoleSettings = ConsoleSettings()


    collector: CollectorSettings = CollectorSettings()
    metrics_port: int = Field(9108, ge=0, le=65_535, description="Prometheus /metrics port of a worker; 0 disables it.")
    metrics_host: str = Field("127.0.0.1", description="Address /metrics listens on (0.0.0.0 in a container).")
    log_level: str = "info"
    profile_path: str = Field("", description="A worker writes a cProfile of itself (every thread, CPU time) to "
                              "this file when it stops; empty: off. `touchpoint bench --profile` sets it.")
    stop_timeout_s: float = Field(25.0, gt=0, description="A worker told to stop (SIGTERM) exits within this "
                                  "long, even when the broker or ClickHouse does not answer.")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        config_file = Path(os.environ.get("TOUCHPOINT_CONFIG", "touchpoint.toml"))
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if config_file.is_file():
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)


def to_env(settings: Settings) -> dict[str, str]:
    """The environment variables that reproduce these settings in a child process (a worker)."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump(mode="json").items():
        if isinstance(value, dict):
            for key, inner in value.items():
                text = json.dumps(inner) if isinstance(inner, dict | list) else str(inner)
                env[f"TOUCHPOINT_{name.upper()}__{key.upper()}"] = text
        elif isinstance(value, list):
            env[f"TOUCHPOINT_{name.upper()}"] = json.dumps(value)
        else:
            env[f"TOUCHPOINT_{name.upper()}"] = str(value)
    return env


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
