"""One settings object for every command: defaults < TOML file < environment (TOUCHPOINT_*)."""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from pipeline.core.identity import DAY_MS, KINDS, IdentityConfig
from pipeline.core.validate import BLANK_IDENTIFIERS

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
    max_message_bytes: int = Field(1_048_576, ge=65_536, description="Largest message the producers send (the "
                                   "broker's message.max.bytes); a dead letter over it goes without its bytes.")


class RegistrySettings(BaseModel):
    # file:// for the local stack (a manifest in schemas/), http(s):// for a Confluent-compatible registry.
    url: str = f"file://{SCHEMAS_DIR / 'registry.json'}"
    subject: str = "touchpoints-value"


class ClickHouseSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 19000
    http_port: int = 18123
    database: str = "touchpoint"
    user: str = "default"
    password: str = ""


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


class BatchSettings(BaseModel):
    max_events: int = Field(20_000, ge=1, description="Flush to ClickHouse once this many events are buffered.")
    max_wait_s: float = Field(1.0, gt=0, description="...or once the oldest buffered event waited this long.")
    retry_max_s: float = Field(30.0, gt=0, description="A failed store write is retried with a backoff doubling "
                               "from 0.5 s up to this; nothing is committed meanwhile.")


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
    habitual_days: float = 90
    lapse_days: float = Field(180, description="No purchase for this long: a former customer.")
    cancelled_days: float = Field(30, description="A cancelled subscription this long ago: a former customer.")

    @model_validator(mode="after")
    def _known_kinds(self) -> IdentitySettings:
        for name, kinds in (("unique_kinds", self.unique_kinds), ("daily_limits", self.daily_limits),
                            ("max_values", self.max_values)):
            unknown = sorted(set(kinds) - set(KINDS))
            if unknown:
                raise ValueError(f"identity.{name} names unknown identifier kinds {unknown}; known: {list(KINDS)}")
        if any(n < 1 for n in self.max_values.values()):
            raise ValueError("identity.max_values must be 1 or more per kind")
        return self

    def core(self) -> IdentityConfig:
        return IdentityConfig(
            unique_kinds=frozenset(self.unique_kinds),
            blocked_values=BLANK_IDENTIFIERS | {v.strip().lower() for v in self.extra_blocked_values},
            daily_limits=dict(self.daily_limits), max_values=dict(self.max_values),
            habitual_purchases=self.habitual_purchases,
            habitual_ms=int(self.habitual_days * DAY_MS), lapse_ms=int(self.lapse_days * DAY_MS),
            cancelled_ms=int(self.cancelled_days * DAY_MS),
        )


class AlertRuleSettings(BaseModel):
    name: str
    indicator: str
    comparison: str = Field(pattern="^(above|below)$")
    threshold: float
    min_denominator: float = Field(20, description="Ignore windows with fewer observations than this.")
    severity: str = "warning"
    window_kind: str = Field("1m", pattern="^(1m|15m|session)$", description="Which windows the rule judges.")


def default_alert_rules() -> list[AlertRuleSettings]:
    return [
        AlertRuleSettings(name="ux_error_rate_high", indicator="error_rate", comparison="above", threshold=0.15),
        AlertRuleSettings(
            name="cx_csat_low", indicator="csat", comparison="below", threshold=0.6, min_denominator=10
        ),
    ]


class StackSettings(BaseModel):
    state_dir: Path = PROJECT_ROOT / ".touchpoint"
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
    identity: IdentitySettings = IdentitySettings()
    alert_rules: list[AlertRuleSettings] = Field(default_factory=default_alert_rules)
    stack: StackSettings = StackSettings()
    metrics_port: int = Field(9108, ge=0, le=65_535, description="Prometheus /metrics port of a worker; 0 disables it.")
    metrics_host: str = Field("127.0.0.1", description="Address /metrics listens on (0.0.0.0 in a container).")
    log_level: str = "info"
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
