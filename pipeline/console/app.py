"""`touchpoint console`: the operations console, an ASGI app (FastAPI on uvicorn). A JSON API, described by the
OpenAPI schema at /openapi.json, and one page that reads nothing but that API; it polls it every few seconds
for live updates (no full reload). Reads are open (the server listens on loopback by default); actions
(acknowledge, silence, resolve an alert; erase a person) need the bearer token from settings (console.token)."""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Query
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from pipeline.adapters.clickhouse_queries import ConsoleQueries
from pipeline.console.alerts import ACTIONS, AlertStore, UnknownAlert
from pipeline.core.indicators import BY_ID, REGISTRY, Kind
from pipeline.core.overview import CX_AXIS, SPLIT, UX_AXIS, position, wilson_interval
from pipeline.core.sketch import quantile
from pipeline.settings import Settings

STATIC = Path(__file__).resolve().parent / "static"
POLL_S = 5  # the page refreshes its data this often


class AxisPart(BaseModel):
    indicator: str
    family: str
    value: float
    count: float = Field(description="Observations pooled (the denominator).")
    bad: float
    good: float
    health: float = Field(description="0 at or beyond bad, 1 at or beyond good.")


class TenantOverview(BaseModel):
    tenant: str
    ux: float | None = Field(description="Mean health of the UX indicators with enough observations (0-1).")
    cx: float | None = Field(description="Mean health of the CX indicators with enough observations (0-1).")
    quadrant: str
    ux_indicators: list[AxisPart]
    cx_indicators: list[AxisPart]


class AxisDefinition(BaseModel):
    indicator: str
    name: str
    family: str
    unit: str
    bad: float
    good: float


class Overview(BaseModel):
    minutes: int
    split: float
    ux_axis: list[AxisDefinition]
    cx_axis: list[AxisDefinition]
    tenants: list[TenantOverview]


class ChannelIndicators(BaseModel):
    tenant: str
    channel: str
    indicators: list[str]


class SeriesPoint(BaseModel):
    window_start_ms: int
    window_end_ms: int
    value: float | None
    n: float = Field(description="Observations in the window (the denominator).")
    low: float | None = Field(None, description="95 % Wilson interval of a rate, lower bound.")
    high: float | None = Field(None, description="95 % Wilson interval of a rate, upper bound.")
    late: int = Field(0, description="Touchpoints that arrived after the window closed (not counted).")
    complete: bool = Field(description="Every partition has closed the window (its cells are all written).")


class Series(BaseModel):
    tenant: str
    channel: str
    indicator: str
    name: str
    family: str
    unit: str
    kind: str
    window_kind: str
    points: list[SeriesPoint]


class AlertAction(BaseModel):
    note: str = ""
    actor: str = Field("console", description="Who acted (free text).")
    minutes: int = Field(60, ge=1, description="How long a silence lasts.")


class EraseRequest(BaseModel):
    identifier: str = Field(description="kind:value (user_id:u-42) or a bare value (every kind is tried).")


def _token_check(settings: Settings) -> Callable[..., None]:
    def require_token(authorization: Annotated[str | None, Header()] = None) -> None:
        expected = settings.console.token
        if not expected:
            raise HTTPException(403, "actions are off: set console.token (TOUCHPOINT_CONSOLE__TOKEN) and restart")
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise HTTPException(401, "a valid token is needed for actions (Authorization: Bearer <token>)")
    return require_token


def _page(settings: Settings) -> str:
    html = (STATIC / "index.html").read_text()
    indicators = "".join(f'<option value="{i.id}">{i.id} ({i.family.value}, {i.unit})</option>' for i in REGISTRY)
    return (html.replace("{{poll_s}}", str(POLL_S)).replace("{{indicator_options}}", indicators)
            .replace("{{overview_minutes}}", str(settings.console.overview_minutes)))


def create_app(settings: Settings, *, queries: ConsoleQueries | None = None, alerts: AlertStore | None = None,
               health: Callable[[], dict[str, Any]] | None = None) -> FastAPI:
    """The console over these settings; queries, the alert store and the health source can be swapped."""
    from pipeline.console.health import HealthSource

    queries = queries or ConsoleQueries(settings.clickhouse)
    if alerts is None:
        from pipeline.app.alert_admin import LifecycleAlertStore

        alerts = LifecycleAlertStore(settings)
    store: AlertStore = alerts
    app = FastAPI(title="Touchpoint operations console", version="1",
                  description="Live CX and UX indicators, alerts, journeys and pipeline health. Reads are open; "
                              "actions need `Authorization: Bearer <console.token>`.",
                  docs_url=None, redoc_url=None)  # the interactive docs load scripts from a CDN
    token = Depends(_token_check(settings))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return _page(settings)

    _indicator_routes(app, settings, queries)
    _alert_routes(app, store, token)
    _person_routes(app, settings, queries, token)
    _health_routes(app, settings, queries, health or HealthSource(settings, queries))
    return app


def _axis_definitions(items: tuple[Any, ...]) -> list[AxisDefinition]:
    return [AxisDefinition(indicator=a.indicator, name=BY_ID[a.indicator].name, family=BY_ID[a.indicator].family.value,
                           unit=BY_ID[a.indicator].unit, bad=a.bad, good=a.good) for a in items]


def _series_points(settings: Settings, queries: ConsoleQueries, definition: Any, tenant: str, channel: str,
                   window_kind: str, minutes: int) -> list[SeriesPoint]:
    """Each window's value (sketch quantile, or total / count), n, a Wilson interval for rates, the late arrivals
    in it, and whether every partition has closed it."""
    cells = queries.series(tenant, channel, definition.id, window_kind, minutes * 60)
    if not cells:
        return []
    checkpoints = queries.checkpoints(settings.kafka.consumer_group, settings.kafka.topic)
    closed = min((c.closed_before_ms for c in checkpoints), default=0)
    late = queries.late_events(tenant, channel, minutes * 60 + settings.window.hopping_size_s,
                               settings.window.size_s * 1000)
    points = []
    for cell in cells:
        value: float | None
        low = high = None
        if definition.kind is Kind.QUANTILE:
            value = quantile(cell.sketch, definition.q)
        else:
            value = cell.total / cell.count if cell.count else None
            interval = wilson_interval(cell.total, cell.count) if definition.kind is Kind.RATIO else None
            if interval is not None:
                low, high = interval
        late_here = sum(n for start, n in late.items() if cell.window_start_ms <= start < cell.window_end_ms)
        points.append(SeriesPoint(window_start_ms=cell.window_start_ms, window_end_ms=cell.window_end_ms,
                                  value=value, n=cell.count, low=low, high=high, late=late_here,
                                  complete=cell.window_end_ms <= closed))
    return points


def _indicator_routes(app: FastAPI, settings: Settings, queries: ConsoleQueries) -> None:
    @app.get("/api/overview", response_model=Overview, summary="Each tenant's place on UX against CX")
    def overview(minutes: int = Query(settings.console.overview_minutes, ge=1, le=7 * 24 * 60)) -> Overview:
        pooled = queries.pooled_by_tenant(minutes * 60)
        tenants = []
        for tenant in sorted(pooled):
            p = position(tenant, pooled[tenant])
            tenants.append(TenantOverview(
                tenant=tenant, ux=p.ux, cx=p.cx, quadrant=p.quadrant,
                ux_indicators=[AxisPart(**_fields(part)) for part in p.ux_indicators],
                cx_indicators=[AxisPart(**_fields(part)) for part in p.cx_indicators]))
        return Overview(minutes=minutes, split=SPLIT, ux_axis=_axis_definitions(UX_AXIS),
                        cx_axis=_axis_definitions(CX_AXIS), tenants=tenants)

    @app.get("/api/channels", response_model=list[ChannelIndicators],
             summary="Tenants and channels with indicator windows")
    def channels(minutes: int = Query(180, ge=1, le=7 * 24 * 60)) -> list[ChannelIndicators]:
        return [ChannelIndicators(tenant=t, channel=c, indicators=i) for t, c, i in queries.channels(minutes * 60)]

    @app.get("/api/series", response_model=Series, summary="An indicator's windows for a tenant and channel")
    def series(tenant: str, channel: str, indicator: str,
               window_kind: str = Query("1m", pattern="^(1m|15m)$"),
               minutes: int = Query(180, ge=1, le=7 * 24 * 60)) -> Series:
        definition = BY_ID.get(indicator)
        if definition is None:
            raise HTTPException(404, f"unknown indicator {indicator!r}")
        points = _series_points(settings, queries, definition, tenant, channel, window_kind, minutes)
        return Series(tenant=tenant, channel=channel, indicator=indicator, name=definition.name,
                      family=definition.family.value, unit=definition.unit, kind=definition.kind.value,
                      window_kind=window_kind, points=points)


def _alert_routes(app: FastAPI, store: AlertStore, token: Any) -> None:
    @app.get("/api/alerts", summary="Alert series active now or changed in the last minutes, with their state "
                                    "(pending, firing, acknowledged, silenced, resolved, no_data)")
    def list_alerts(minutes: int = Query(24 * 60, ge=1, le=30 * 24 * 60)) -> list[dict[str, Any]]:
        return store.list(minutes * 60, _now_ms())

    @app.get("/api/alerts/{alert_id:path}", summary="One alert series with its transitions and operators' commands")
    def get_alert(alert_id: str) -> dict[str, Any]:
        found = store.get(alert_id, _now_ms())
        if found is None:
            raise HTTPException(404, f"no alert {alert_id!r}")
        return found

    @app.post("/api/alerts/{alert_id:path}/{action}", dependencies=[token],
              summary="Acknowledge, silence (for `minutes`) or resolve an alert (token needed)")
    def act(alert_id: str, action: str, body: AlertAction | None = None) -> dict[str, Any]:
        if action not in ACTIONS:
            raise HTTPException(404, f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
        body = body or AlertAction(note="", actor="console", minutes=60)
        now_ms = _now_ms()
        until = now_ms + body.minutes * 60_000 if action == "silence" else 0
        try:
            return store.act(alert_id, action, body.actor, body.note, until, now_ms)
        except UnknownAlert:
            raise HTTPException(404, f"no alert {alert_id!r}") from None

    @app.get("/api/cases", summary="Follow-up cases of detractor customers, with their SLA countdowns")
    def cases(all_cases: bool = Query(False, alias="all", description="Closed cases too.")) -> dict[str, Any]:
        now_ms = _now_ms()
        found = store.cases(now_ms, all_cases)
        return {"available": True, "now_ms": now_ms, "cases": found,
                "note": f"{sum(c['status'] != 'closed' for c in found)} open cases, "
                        f"{sum(c['status'] == 'escalated' for c in found)} escalated past their SLA"}


def _person_routes(app: FastAPI, settings: Settings, queries: ConsoleQueries, token: Any) -> None:
    @app.get("/api/journey", summary="A person's touchpoints across channels, with roles and merges")
    def journey(identifier: str = Query(min_length=1)) -> dict[str, Any]:
        from pipeline.app.erasure import candidates

        found = queries.journey(candidates(identifier.strip()))
        return {"identifier": identifier, "identifiers": found.identifiers, "person_ids": found.person_ids,
                "touchpoints": found.touchpoints, "merges": found.merges, "transitions": found.transitions}

    @app.post("/api/persons/erase", dependencies=[token],
              summary="Erase a person everywhere (pipeline/app/erasure.py; audited; token needed)")
    def erase(body: EraseRequest) -> dict[str, Any]:
        from pipeline.app.erasure import forget

        report = forget(settings, body.identifier.strip())
        return {"identifiers": report.identifiers, "person_ids": report.person_ids,
                "touchpoints_deleted": report.rows_before}


def _health_routes(app: FastAPI, settings: Settings, queries: ConsoleQueries,
                   health: Callable[[], dict[str, Any]]) -> None:
    @app.get("/api/health", summary="Per-partition lag and watermark, last flush, dead letters by reason")
    def pipeline_health() -> dict[str, Any]:
        return health()

    @app.get("/api/deadletters", summary="Dead letters (decoded where they decode, hex where not)")
    def dead_letters(reason: str | None = None, since: str | None = None,
                     limit: int = Query(100, ge=1, le=10_000)) -> dict[str, Any]:
        from pipeline.app.deadletters import DeadLetterError, list_dead_letters, parse_since

        try:
            since_ms = parse_since(since, _now_ms()) if since else None
        except DeadLetterError as exc:
            raise HTTPException(422, str(exc)) from None
        listing = list_dead_letters(settings, reason=reason, since_ms=since_ms,
                                    newest=settings.console.dead_letters_scanned, queries=queries)
        newest_first = sorted(listing.dead_letters, key=lambda d: (d.timestamp_ms, d.offset), reverse=True)
        return {"scanned": listing.scanned, "by_reason": listing.by_reason,
                "dead_letters": [d.as_dict() for d in newest_first[:limit]]}


def _fields(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in obj.__dataclass_fields__}


def _now_ms() -> int:
    return int(time.time() * 1000)


def serve(settings: Settings, *, host: str | None = None, port: int | None = None) -> None:
    """Run the console in the foreground (uvicorn)."""
    import uvicorn

    uvicorn.run(create_app(settings), host=host or settings.console.host, port=port or settings.console.port,
                log_level="warning")
