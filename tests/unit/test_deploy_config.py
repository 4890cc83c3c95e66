"""The deployment files agree with the code: every TOUCHPOINT_* variable in docker-compose.yml and the
Dockerfile is a real setting (and is read as one), Prometheus scrapes the port the workers serve on the
service they run as, and the Grafana dashboard and the alert rules only query metrics the workers expose."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from pipeline.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

# The pipeline-health metrics the dashboard is about, as Prometheus names them (counters get `_total`,
# histograms are queried through `_bucket`, `_sum` and `_count`).
DOCUMENTED_METRICS = {
    "touchpoint_events_in_total": "counter",
    "touchpoint_events_out_total": "counter",
    "touchpoint_events_dead_lettered_total": "counter",
    "touchpoint_events_late_total": "counter",
    "touchpoint_events_duplicate_total": "counter",
    "touchpoint_batch_size_events": "histogram",
    "touchpoint_clickhouse_insert_duration_seconds": "histogram",
    "touchpoint_consumer_lag_events": "gauge",
    "touchpoint_watermark_lag_seconds": "gauge",
}
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")
METRIC_TOKEN = re.compile(r"\btouchpoint_[a-z0-9_]+\b")
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def series_names(metrics: dict[str, str]) -> set[str]:
    names = set()
    for name, kind in metrics.items():
        names |= {name + suffix for suffix in HISTOGRAM_SERIES} if kind == "histogram" else {name}
    return names


def exposed_series() -> set[str]:
    """What the worker's prometheus_client metrics are scraped as, read from pipeline/adapters/metrics.py."""
    from prometheus_client.metrics import MetricWrapperBase

    from pipeline.adapters import metrics

    exposed = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            family = value.describe()[0]
            exposed[family.name + "_total" if family.type == "counter" else family.name] = family.type
    return series_names(exposed)


def settings_env_names(model: type[BaseModel] = Settings) -> set[str]:
    """Every environment variable Settings reads: TOUCHPOINT_<FIELD>, and TOUCHPOINT_<SECTION>__<KEY> for the
    fields of a nested model (walking the pydantic fields with the configured prefix and delimiter)."""
    prefix = Settings.model_config["env_prefix"]
    delimiter = Settings.model_config["env_nested_delimiter"]

    def walk(model: type[BaseModel], path: str) -> set[str]:
        names = set()
        for name, field in model.model_fields.items():
            env = path + name.upper()
            names.add(env)
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                names |= walk(annotation, env + delimiter)
        return names

    return walk(model, prefix)


def interpolate(value: Any) -> str:
    """Compose's `${NAME:-default}` with nothing set in the environment: the default."""
    return INTERPOLATION.sub(lambda m: m[2] or "", str(value))


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: interpolate(value) for key, value in env.items()}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


@pytest.fixture(scope="module")
def prometheus() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "touchpoint-pipeline.json").read_text())


def app_services(services: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services.items() if "deploy/Dockerfile" in str(s.get("build", ""))}


def worker_metrics_port(services: dict[str, Any]) -> int:
    return int(environment(services["worker"]).get("TOUCHPOINT_METRICS_PORT", Settings().metrics_port))


def test_the_documented_metrics_are_what_the_workers_expose():
    assert series_names(DOCUMENTED_METRICS) <= exposed_series()


def test_compose_runs_init_worker_and_generator_from_the_dockerfile(services):
    assert {"init", "worker", "generator"} <= set(app_services(services))
    assert services["init"]["command"] == ["init"] and services["init"]["restart"] == "no"
    assert services["worker"]["command"] == ["worker"]
    assert services["generator"]["profiles"] == ["demo"]
    for name in ("worker", "generator"):
        assert services[name]["depends_on"]["init"]["condition"] == "service_completed_successfully"
    for name in ("kafka", "schema-registry", "clickhouse"):  # init waits for these to be healthy
        assert services["init"]["depends_on"][name]["condition"] == "service_healthy"
        assert services[name]["healthcheck"]["test"]
    assert services["worker"]["deploy"]["replicas"] >= 2
    assert "container_name" not in services["worker"]  # replicas need generated names


def test_compose_runs_the_alerter_console_and_collector_beside_the_workers(services, monkeypatch):
    for name in ("alerter", "console", "collector"):
        assert name in app_services(services), name
        assert services[name]["command"] == [name]
        assert services[name]["depends_on"]["init"]["condition"] == "service_completed_successfully"
    assert services["alerter"]["deploy"]["replicas"] >= 2  # the lease keeps one active, the other stands by
    for key in list(os.environ):
        if key.startswith("TOUCHPOINT_"):
            monkeypatch.delenv(key)
    for name in ("console", "collector"):
        for key, value in environment(services[name]).items():
            monkeypatch.setenv(key, value)
        settings = getattr(Settings(), name)
        for key in environment(services[name]):
            monkeypatch.delenv(key, raising=False)
        assert settings.host == "0.0.0.0", name  # reachable through the published port, not loopback only
        published = [p for p in services[name]["ports"] if p.endswith(f":{settings.port}")]
        assert published and all(p.startswith("127.0.0.1:") for p in published), name  # host side on loopback
        assert f":{settings.port}/" in " ".join(services[name]["healthcheck"]["test"]), name


def test_every_touchpoint_variable_in_compose_is_a_setting(services):
    known = settings_env_names()
    used = {key for s in services.values() for key in environment(s) if key.startswith("TOUCHPOINT_")}
    assert used, "compose sets no TOUCHPOINT_* variable"
    assert used <= known, f"not settings of pipeline.settings.Settings: {sorted(used - known)}"


def test_every_touchpoint_variable_in_the_dockerfile_is_a_setting():
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    env_lines = [line for line in text.splitlines() if line.strip().startswith("ENV ")]
    used = set(re.findall(r"\b(TOUCHPOINT_[A-Z0-9_]+)=", "\n".join(env_lines)))
    assert used <= settings_env_names(), sorted(used - settings_env_names())


@pytest.mark.parametrize("service", ["init", "worker", "generator", "alerter", "console", "collector"])
def test_compose_environment_is_read_by_settings(services, service, monkeypatch):
    for key in list(os.environ):
        if key.startswith("TOUCHPOINT_"):
            monkeypatch.delenv(key)
    env = environment(services[service])
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.kafka.bootstrap_servers == env["TOUCHPOINT_KAFKA__BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert settings.registry.url == env["TOUCHPOINT_REGISTRY__URL"] == "http://schema-registry:8081"
    assert settings.kafka.partitions == int(env["TOUCHPOINT_KAFKA__PARTITIONS"])
    assert settings.kafka.replication_factor == 1  # one broker in this stack
    assert (settings.clickhouse.host, settings.clickhouse.port) == ("clickhouse", 9000)  # the image's native port
    assert settings.metrics_port == worker_metrics_port(services)


def test_clickhouse_credentials_match_the_server(services):
    server = environment(services["clickhouse"])
    app = environment(services["init"])
    assert app["TOUCHPOINT_CLICKHOUSE__USER"] == server["CLICKHOUSE_USER"]
    assert app["TOUCHPOINT_CLICKHOUSE__PASSWORD"] == server["CLICKHOUSE_PASSWORD"]
    assert services["clickhouse"]["ulimits"]["nofile"]["soft"] >= 262144


def test_prometheus_scrapes_every_worker_on_its_metrics_port(services, prometheus):
    port = worker_metrics_port(services)
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    sd = jobs["touchpoint-worker"]["dns_sd_configs"]
    assert [c["names"] for c in sd] == [["worker"]]  # the compose service name: one A record per replica
    assert all(c["type"] == "A" and c["port"] == port for c in sd)
    assert str(port) in [str(p) for p in services["worker"].get("expose", [])]
    # /metrics is on loopback by default; a container must listen on its network for Prometheus to reach it.
    assert environment(services["worker"]).get("TOUCHPOINT_METRICS_HOST", Settings().metrics_host) == "0.0.0.0"
    assert f"EXPOSE {port}" in (DEPLOY / "Dockerfile").read_text()


def test_prometheus_loads_the_alert_rules_it_is_given(services, prometheus):
    mount = next(v for v in services["prometheus"]["volumes"] if v.startswith("./deploy/prometheus:"))
    container_dir = mount.split(":")[1]
    for rule_file in prometheus["rule_files"]:
        assert rule_file.startswith(container_dir + "/")
        assert (DEPLOY / "prometheus" / rule_file.removeprefix(container_dir + "/")).is_file()


def test_alert_rules_query_exposed_metrics():
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    exposed = exposed_series()
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    names = {rule["alert"] for rule in alerts}
    assert {"TouchpointDeadLetterRateHigh", "TouchpointConsumerLagGrowing", "TouchpointClickHouseInsertSlow",
            "TouchpointWorkerDown"} <= names
    for rule in alerts:
        assert rule["labels"]["severity"] in {"warning", "critical"} and rule["annotations"]["summary"]
        unknown = set(METRIC_TOKEN.findall(rule["expr"])) - exposed
        assert not unknown, f"{rule['alert']} queries {sorted(unknown)}"


def prometheus_queries(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", []) if "expr" in t]


def test_dashboard_queries_only_documented_metrics(dashboard):
    allowed = series_names(DOCUMENTED_METRICS)
    queries = prometheus_queries(dashboard)
    assert queries
    for query in queries:
        unknown = set(METRIC_TOKEN.findall(query)) - allowed
        assert not unknown, f"{query!r} uses {sorted(unknown)}"


def test_dashboard_shows_every_documented_metric(dashboard):
    used = {token for query in prometheus_queries(dashboard) for token in METRIC_TOKEN.findall(query)}
    for name, kind in DOCUMENTED_METRICS.items():
        assert (name + "_bucket" if kind == "histogram" else name) in used, f"no panel shows {name}"


def test_dashboard_uses_provisioned_data_sources(services, dashboard):
    provisioned = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "datasources.yml").read_text())
    uids = {ds["uid"]: ds["type"] for ds in provisioned["datasources"]}
    refs = [p["datasource"] for p in dashboard["panels"] if "datasource" in p]
    refs += [t["datasource"] for p in dashboard["panels"] for t in p.get("targets", []) if "datasource" in t]
    assert refs
    for ref in refs:
        assert uids.get(ref["uid"]) == ref["type"], ref
    if "grafana-clickhouse-datasource" in uids.values():  # the plugin must be installed before provisioning
        assert "grafana-clickhouse-datasource" in environment(services["grafana"])["GF_PLUGINS_PREINSTALL_SYNC"]


def test_grafana_loads_the_dashboard_folder_compose_mounts(services):
    providers = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "dashboards.yml").read_text())
    paths = {p["options"]["path"] for p in providers["providers"]}
    mounts = dict(v.split(":")[:2][::-1] for v in services["grafana"]["volumes"] if v.startswith("./"))
    assert {mounts[path] for path in paths} == {"./deploy/grafana/dashboards"}
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"


def clickhouse_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p.get("datasource", {}).get("type") == "grafana-clickhouse-datasource"]


# The Grafana unit of each registry unit: rates on a 0-100 % axis, times in ms, the rest as plain numbers.
GRAFANA_UNIT = {"ratio": "percentunit", "ms": "ms", "points": "none", "score": "none", "channels": "none",
                "contacts": "none"}


def test_every_dashboard_panel_has_a_unit(dashboard):
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["fieldConfig"]["defaults"].get("unit"), f"panel {panel['title']!r} has no unit"


def test_indicator_panels_plot_one_unit_each_and_every_indicator_somewhere(dashboard):
    from pipeline.core.indicators import BY_ID, REGISTRY

    plotted = set()
    for panel in clickhouse_panels(dashboard):
        sql = panel["targets"][0]["rawSql"]
        if "indicator_values_by_channel" not in sql:
            continue
        indicators = re.findall(r"'([a-z0-9_]+)'", sql.split("indicator IN (", 1)[1].split(")", 1)[0])
        assert indicators, panel["title"]
        units = {GRAFANA_UNIT[BY_ID[i].unit] for i in indicators}
        assert units == {panel["fieldConfig"]["defaults"]["unit"]}, (panel["title"], indicators)
        kind = re.search(r"window_kind = '([a-z0-9]+)'", sql)[1]  # type: ignore[index]
        assert all(kind in BY_ID[i].windows for i in indicators), (panel["title"], kind)
        if panel["fieldConfig"]["defaults"]["unit"] == "percentunit":
            assert (panel["fieldConfig"]["defaults"]["min"], panel["fieldConfig"]["defaults"]["max"]) == (0, 1)
        plotted |= set(indicators)
    assert plotted == {i.id for i in REGISTRY}


def test_dashboard_has_tenant_and_channel_variables_that_its_clickhouse_panels_use(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"tenant", "channel"} <= set(variables)
    for name in ("tenant", "channel"):
        assert variables[name]["datasource"]["uid"] == "touchpoint-clickhouse" and variables[name]["multi"]
        assert "FROM touchpoint." in variables[name]["query"]
    assert "${tenant:singlequote}" in variables["channel"]["query"]  # channels of the chosen tenants
    for panel in clickhouse_panels(dashboard):
        sql = panel["targets"][0]["rawSql"]
        assert "${tenant:singlequote}" in sql, panel["title"]
        if "window_kind = 'session'" not in sql:  # session cells have channel ALL
            assert "${channel:singlequote}" in sql, panel["title"]


def test_dashboard_alert_panels_read_the_alerters_tables(dashboard):
    sqls = {p["title"]: p["targets"][0]["rawSql"] for p in clickhouse_panels(dashboard)}
    table = [p for p in clickhouse_panels(dashboard) if p["type"] == "table"
             and "touchpoint.alert_current" in p["targets"][0]["rawSql"]]
    assert table and "touchpoint.alert_events" in table[0]["targets"][0]["rawSql"]
    assert "$__timeFilter(" in table[0]["targets"][0]["rawSql"]
    assert any("touchpoint.alert_events" in sql and "to_state" in sql for sql in sqls.values())
    every_query = json.dumps(dashboard)
    assert "touchpoint.alerts " not in every_query and "touchpoint.alerts\\n" not in every_query  # old table
    assert "alerts_fired" not in every_query  # workers no longer judge, so they count no alerts


def test_grafana_reads_clickhouse_as_a_read_only_user_of_its_own(services):
    import xml.etree.ElementTree as ET

    mount = next(v for v in services["clickhouse"]["volumes"] if "users.d" in v)
    source, target = mount.split(":")[:2]
    assert target.startswith("/etc/clickhouse-server/users.d/") and target.endswith(".xml")
    config = ET.parse(ROOT / source.removeprefix("./")).getroot()
    grafana_env = environment(services["grafana"])
    user_name = grafana_env["CLICKHOUSE_GRAFANA_USER"]
    user = config.find(f"users/{user_name}")
    assert user is not None
    assert user_name != environment(services["clickhouse"])["CLICKHOUSE_USER"]  # not the pipeline's user
    password_env = user.find("password").get("from_env")  # type: ignore[union-attr]
    assert password_env in environment(services["clickhouse"])
    assert environment(services["clickhouse"])[password_env] == grafana_env["CLICKHOUSE_GRAFANA_PASSWORD"]
    profile = config.find(f"profiles/{user.findtext('profile')}")
    assert profile is not None and profile.findtext("readonly") == "1"
    grants = [q.text for q in user.findall("grants/query")]
    assert grants == ["GRANT SELECT ON touchpoint.*"]
    provisioned = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "datasources.yml").read_text())
    clickhouse = next(ds for ds in provisioned["datasources"] if ds["type"] == "grafana-clickhouse-datasource")
    assert clickhouse["jsonData"]["username"] == "$CLICKHOUSE_GRAFANA_USER"
    assert clickhouse["secureJsonData"]["password"] == "$CLICKHOUSE_GRAFANA_PASSWORD"
    assert "CLICKHOUSE_PASSWORD" not in grafana_env  # Grafana never holds the read-write password


def test_workers_with_an_on_disk_identity_store_keep_their_state_dir_on_a_volume(compose: dict[str, Any],
                                                                              services: dict[str, Any]) -> None:
    from pipeline.settings import Settings

    worker = services["worker"]
    env = {**compose["x-touchpoint-env"], **{k: v for k, v in worker["environment"].items() if k != "<<"}}
    settings = Settings.model_validate({"identity": {"store": env["TOUCHPOINT_IDENTITY__STORE"]}})
    assert settings.identity.store.startswith("rocksdb")
    state_dir = env["TOUCHPOINT_STACK__STATE_DIR"]
    named = {volume.split(":")[0]: volume.split(":")[1] for volume in worker["volumes"]}
    assert state_dir in named.values()  # a container's own layer would lose the graph at every recreate
    assert set(named) <= set(compose["volumes"])
