"""`touchpoint collector`: the HTTP door (Starlette on uvicorn). Thin: it authenticates, reads the body, lets
intake.py and mapping.py decide, and answers only once delivery.py says what the broker acknowledged."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Protocol

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from pipeline.adapters.kafka import TouchpointEncoder
from pipeline.collector.intake import Checked, Refused, check_batch, parse_touchpoints, read_body
from pipeline.collector.keys import Denied, Grant, KeyRing
from pipeline.collector.mapping import SHIPPED_DIR, WebhookMapping, contract_field_names, load_mappings
from pipeline.collector.metrics import CONTENT_TYPE, CollectorMetrics
from pipeline.contract.registry import open_registry
from pipeline.settings import Settings

log = logging.getLogger("touchpoint.collector")
SNIPPET = Path(__file__).resolve().parent / "static" / "touchpoint.js"
UNAVAILABLE = "broker_unavailable"
PREFLIGHT_HEADERS = {
    "Access-Control-Allow-Methods": "POST, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, Content-Encoding",
    "Access-Control-Max-Age": "600",
}


class Deliverer(Protocol):
    @property
    def ready(self) -> bool: ...

    def connect(self) -> None: ...

    async def deliver(self, keys: list[bytes], values: list[bytes], timeout_s: float) -> list[bool]: ...

    def close(self) -> None: ...


def _json(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content), status_code=status, headers=headers, media_type="application/json")


class Collector:
    def __init__(self, settings: Settings, delivery: Deliverer | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.config = settings.collector
        registry = open_registry(settings.registry.url)
        self.encoder = TouchpointEncoder(registry, settings.registry.subject)
        raw_schema = registry.latest(settings.registry.subject)[1]
        self.mappings: dict[str, WebhookMapping] = load_mappings(
            [SHIPPED_DIR, *self.config.webhook_dirs], contract_field_names(raw_schema))
        self.keys = KeyRing(list(self.config.tenants))
        self.blocked = settings.identity.core().blocked_values
        self.max_future_ms = settings.window.max_future_s * 1000
        if delivery is None:
            from pipeline.collector.delivery import Delivery

            delivery = Delivery(settings.kafka.bootstrap_servers, settings.kafka.topic,
                                max_unacked=self.config.max_unacked_events, ack_timeout_s=self.config.ack_timeout_s)
        self.delivery: Deliverer = delivery
        self.clock = clock
        self.metrics = CollectorMetrics(lambda: float(getattr(self.delivery, "unacked", 0)))
        self.pending = asyncio.Semaphore(self.config.max_pending_requests)
        self.snippet = SNIPPET.read_bytes() if SNIPPET.exists() else b""

    # --- who is asking -------------------------------------------------------------------------------------------

    @staticmethod
    def _key_of(request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        if header[:7].lower() == "bearer ":
            return header[7:].strip()
        return request.query_params.get("key")

    def _cors(self, origin: str | None, grant: Grant | None) -> dict[str, str]:
        if origin is None or grant is None or not grant.allows_origin(origin):
            return {}
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}

    def _authorise(self, request: Request) -> Grant:
        grant = self.keys.authenticate(self._key_of(request))
        origin = request.headers.get("origin")
        if not grant.allows_origin(origin):
            raise Denied(403, f"origin {origin} is not allowed for tenant {grant.tenant}")
        return grant

    async def _body(self, request: Request) -> bytes:
        limit = self.config.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise Refused(413, f"request body is {declared} bytes; the limit is {limit}")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise Refused(413, f"request body is over {limit} bytes; the limit is {limit}")
            chunks.append(chunk)
        return read_body(b"".join(chunks), request.headers.get("content-encoding"), limit)

    # --- answering -----------------------------------------------------------------------------------------------

    async def _deliver(self, checked: Checked, extra: list[dict[str, Any]], cors: dict[str, str]) -> Response:
        """Produce the accepted touchpoints and answer with every result once the broker has acknowledged them."""
        results = checked.results + extra
        acked: list[bool] = []
        if checked.indexes:
            # One deadline for the whole wait: a place among the pending requests, then the acknowledgements.
            started = time.monotonic()
            try:
                await asyncio.wait_for(self.pending.acquire(), self.config.ack_timeout_s)
            except TimeoutError:
                acked = [False] * checked.accepted
            else:
                try:
                    remaining = self.config.ack_timeout_s - (time.monotonic() - started)
                    acked = await self.delivery.deliver(checked.keys, checked.values, remaining)
                finally:
                    self.pending.release()
        missing = 0
        for index, ok in zip(checked.indexes, acked, strict=True):
            if not ok:
                missing += 1
                results[index].update(status="unavailable", reason=UNAVAILABLE,
                                      detail="the broker did not acknowledge it in time; send it again (same "
                                             "event_id: it is counted once)")
        accepted = sum(1 for r in results if r["status"] == "accepted")
        body = {"accepted": accepted, "rejected": sum(1 for r in results if r["status"] == "rejected"),
                "unavailable": missing, "results": results}
        if missing:
            return _json(body, 503, {**cors, "Retry-After": str(self.config.retry_after_s)})
        return _json(body, 200, cors)

    async def _handle(self, request: Request, endpoint: str,
                      work: Callable[[Grant, bytes], tuple[Checked, list[dict[str, Any]]]]) -> Response:
        started = time.monotonic()
        results: list[dict[str, Any]] = []
        response = await self._answer(request, work, results)
        grant: Grant | None = getattr(request.state, "grant", None)
        self.metrics.answered(endpoint, response.status_code, time.monotonic() - started,
                              grant.tenant if grant else None, results)
        return response

    async def _answer(self, request: Request, work: Callable[[Grant, bytes], tuple[Checked, list[dict[str, Any]]]],
                      results: list[dict[str, Any]]) -> Response:
        origin = request.headers.get("origin")
        grant: Grant | None = None
        try:
            grant = self._authorise(request)
            request.state.grant = grant
            if not self.delivery.ready:
                return _json({"error": "the broker is not reachable yet"}, 503,
                             {**self._cors(origin, grant), "Retry-After": str(self.config.retry_after_s)})
            body = await self._body(request)
            checked, extra = work(grant, body)
        except Denied as denied:
            headers = self._cors(origin, grant)
            if denied.retry_after_s:
                headers["Retry-After"] = str(denied.retry_after_s)
            return _json({"error": denied.reason}, denied.status, headers)
        except Refused as refused:
            return _json({"error": refused.reason}, refused.status, self._cors(origin, grant))
        response = await self._deliver(checked, extra, self._cors(origin, grant))
        results.extend(checked.results)
        results.extend(extra)
        return response

    def _check(self, grant: Grant, items: list[Any]) -> Checked:
        return check_batch(items, grant.tenant, self.encoder, int(self.clock() * 1000), self.max_future_ms,
                           self.blocked, self.config.max_event_bytes)

    async def touchpoints(self, request: Request) -> Response:
        def work(grant: Grant, body: bytes) -> tuple[Checked, list[dict[str, Any]]]:
            items = parse_touchpoints(body, self.config.max_events_per_request)
            self.keys.admit(grant, len(items), self.clock())
            return self._check(grant, items), []

        return await self._handle(request, "touchpoints", work)

    async def webhook(self, request: Request) -> Response:
        source = request.path_params["source"]
        mapping = self.mappings.get(source)
        if mapping is None:
            return _json({"error": f"no webhook mapping for source {source!r}; known: {sorted(self.mappings)}"}, 404)

        def work(grant: Grant, body: bytes) -> tuple[Checked, list[dict[str, Any]]]:
            payloads = parse_touchpoints(body, self.config.max_events_per_request)
            mapped: list[Any] = []
            failures: list[tuple[str, str]] = []
            for payload in payloads:
                for made in mapping.touchpoints(payload):
                    if isinstance(made, tuple):
                        failures.append(made)
                    else:
                        mapped.append(made)
            self.keys.admit(grant, max(1, len(mapped)), self.clock())
            checked = self._check(grant, mapped)
            extra = [{"index": len(mapped) + i, "event_id": None, "status": "rejected", "reason": reason,
                      "detail": detail} for i, (reason, detail) in enumerate(failures)]
            return checked, extra

        return await self._handle(request, "webhook:" + source, work)

    async def preflight(self, request: Request) -> Response:
        origin = request.headers.get("origin")
        key = request.query_params.get("key")
        allowed = self.keys.all_origins()
        if key:
            try:
                allowed = self.keys.authenticate(key).cors_origins
            except Denied:
                allowed = frozenset()
        if origin is None or not ("*" in allowed or origin in allowed):
            return Response(status_code=403)
        return Response(status_code=204, headers={**PREFLIGHT_HEADERS, "Access-Control-Allow-Origin": origin,
                                                  "Vary": "Origin"})

    async def snippet_js(self, request: Request) -> Response:
        return Response(self.snippet, media_type="application/javascript",
                        headers={"Cache-Control": "public, max-age=3600", "Access-Control-Allow-Origin": "*"})

    async def snippet_licence(self, request: Request) -> Response:
        return Response((SNIPPET.parent / "web-vitals.LICENSE").read_bytes(), media_type="text/plain")

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE)

    async def health(self, request: Request) -> Response:
        ready = self.delivery.ready
        return _json({"broker": "connected" if ready else "not reachable", "sources": sorted(self.mappings)},
                     200 if ready else 503)


def create_app(settings: Settings | None = None, delivery: Deliverer | None = None,
               clock: Callable[[], float] = time.time) -> Starlette:
    if settings is None:
        from pipeline.settings import get_settings

        settings = get_settings()
    collector = Collector(settings, delivery, clock)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        collector.delivery.connect()
        try:
            yield
        finally:
            collector.delivery.close()

    routes = [
        Route("/v1/touchpoints", collector.touchpoints, methods=["POST"]),
        Route("/v1/touchpoints", collector.preflight, methods=["OPTIONS"]),
        Route("/v1/webhooks/{source}", collector.webhook, methods=["POST"]),
        Route("/v1/webhooks/{source}", collector.preflight, methods=["OPTIONS"]),
        Route("/v1/snippet.js", collector.snippet_js, methods=["GET"]),
        Route("/v1/web-vitals.LICENSE", collector.snippet_licence, methods=["GET"]),
        Route("/healthz", collector.health, methods=["GET"]),
        Route("/metrics", collector.metrics_text, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.collector = collector
    return app


def run(settings: Settings) -> None:
    """Serve until stopped (SIGINT/SIGTERM); uvicorn with uvloop and httptools."""
    import uvicorn

    config = settings.collector
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)  # connection chatter, not the collector's story
    if not config.tenants:
        log.warning("no tenants configured (collector.tenants): every request will get 401")
    uvicorn.run("pipeline.collector.app:create_app", factory=True, host=config.host, port=config.port,
                workers=config.workers, loop="uvloop", http="httptools", access_log=False,
                log_level=settings.log_level.lower(), timeout_graceful_shutdown=int(config.ack_timeout_s) + 1)
