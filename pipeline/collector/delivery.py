"""Thin Kafka adapter of the collector: produce a request's records with acks=all from an idempotent producer
and wait, within a bounded time, until the broker has acknowledged each one.

kafka-python's producer, not aiokafka's: aiokafka asks for a producer id with InitProducerId v0, which the local
Tansu broker refuses, while kafka-python's v2+ request works. Its send() can block (metadata, full buffer), so it
runs on a small thread pool and its acknowledgements come back to the event loop once per request."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError, KafkaTimeoutError

log = logging.getLogger("touchpoint.collector")


class _Countdown:
    """Resolves an asyncio future once `pending` acknowledgements (or failures) have come in."""

    def __init__(self, pending: int, loop: asyncio.AbstractEventLoop, done: asyncio.Future[None],
                 settled: Callable[[int], None]) -> None:
        self.pending = pending
        self.loop = loop
        self.done = done
        self.settled = settled
        self.lock = threading.Lock()

    def one(self, _result: Any = None) -> None:
        self.many(1)

    def many(self, count: int) -> None:
        self.settled(count)
        with self.lock:
            self.pending -= count
            finished = self.pending <= 0
        if finished:
            self.loop.call_soon_threadsafe(_resolve, self.done)


def _resolve(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


class Delivery:
    def __init__(self, bootstrap_servers: str, topic: str, *, max_unacked: int, ack_timeout_s: float,
                 client_id: str = "touchpoint-collector", producer_factory: Callable[..., Any] = KafkaProducer) -> None:
        self.producer_factory = producer_factory
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.ack_timeout_s = ack_timeout_s
        # kafka-python 3 has no buffer_memory: the records the producer holds are bounded here instead.
        self.max_unacked = max_unacked
        self.unacked = 0
        self._unacked_lock = threading.Lock()
        self.config: dict[str, Any] = {
            "acks": "all", "enable_idempotence": True, "linger_ms": 5, "batch_size": 256 * 1024,
            "max_block_ms": int(ack_timeout_s * 1000),
            "request_timeout_ms": 10_000, "delivery_timeout_ms": 30_000, "max_request_size": 4 * 1024 * 1024,
            "client_id": client_id,
        }
        self.producer: Any = None
        self.generation = 0  # a new producer starts a new count of unacknowledged records
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="collector-send")
        self._connecting = threading.Event()
        self._closed = False

    @property
    def ready(self) -> bool:
        return self.producer is not None

    def connect(self) -> None:
        """Create the producer in the background, retrying while the broker does not answer; until then every
        request gets 503."""
        if self._connecting.is_set():
            return
        self._connecting.set()

        def attempt() -> None:
            while not self._closed and self.producer is None:
                try:
                    self.producer = self.producer_factory(bootstrap_servers=self.bootstrap_servers, **self.config)
                    log.info("producer connected to %s", self.bootstrap_servers)
                except (KafkaError, OSError) as exc:  # broker down or unreachable: retry, answer 503 meanwhile
                    log.warning("broker %s not reachable (%s); retrying", self.bootstrap_servers, exc)
                    time.sleep(1.0)
                except Exception as exc:  # a wrong setting: retrying cannot help
                    log.error("cannot create the Kafka producer: %s", exc)
                    return

        threading.Thread(target=attempt, name="collector-connect", daemon=True).start()

    def _reset(self, producer: Any, reason: BaseException) -> None:
        """A producer in a fatal state (e.g. a restarted broker refused to renew its producer id) never recovers:
        drop it and connect a new one, with a new producer id and a fresh count of unacknowledged records."""
        with self._unacked_lock:
            if self.producer is not producer:
                return  # another request already replaced it
            self.producer = None
            self.generation += 1
            self.unacked = 0
        log.warning("the producer failed (%s: %s); starting a new one", type(reason).__name__, reason)
        threading.Thread(target=producer.close, kwargs={"timeout": 0}, daemon=True).start()
        self._connecting.clear()
        self.connect()

    def _send_all(self, keys: Sequence[bytes], values: Sequence[bytes], countdown: _Countdown) -> list[Any]:
        producer = self.producer
        futures: list[Any] = []
        if producer is None:
            countdown.many(len(values))
            return futures
        for key, value in zip(keys, values, strict=True):
            try:
                future = producer.send(self.topic, key=key, value=value)
            except Exception as exc:  # buffer full or no metadata within max_block_ms: the rest is not sent
                log.warning("send failed after %d of %d records: %s", len(futures), len(values), exc)
                countdown.many(len(values) - len(futures))
                if not isinstance(exc, KafkaTimeoutError):
                    self._reset(producer, exc)
                break
            future.add_both(countdown.one)
            futures.append(future)
        return futures

    def _settler(self, generation: int) -> Callable[[int], None]:
        def settled(count: int) -> None:
            with self._unacked_lock:
                if self.generation == generation:
                    self.unacked -= count

        return settled

    async def deliver(self, keys: Sequence[bytes], values: Sequence[bytes], timeout_s: float | None = None
                      ) -> list[bool]:
        """Send the records; returns, per record, whether the broker acknowledged it within `timeout_s`
        (ack_timeout_s when None)."""
        budget = self.ack_timeout_s if timeout_s is None else timeout_s
        if not values or budget <= 0:
            return [False] * len(values)
        producer = self.producer
        if producer is None:
            return [False] * len(values)
        loop = asyncio.get_running_loop()
        started = loop.time()
        # Room for these records among the unacknowledged ones, or nothing is sent (bounded memory).
        while True:
            with self._unacked_lock:
                generation = self.generation
                if self.unacked + len(values) <= max(self.max_unacked, len(values)):
                    self.unacked += len(values)
                    break
            if loop.time() - started >= budget:
                return [False] * len(values)
            await asyncio.sleep(0.01)
        done: asyncio.Future[None] = loop.create_future()
        countdown = _Countdown(len(values), loop, done, self._settler(generation))
        futures = await loop.run_in_executor(self.executor, self._send_all, keys, values, countdown)
        remaining = budget - (loop.time() - started)
        if remaining > 0:
            try:
                await asyncio.wait_for(done, remaining)
            except TimeoutError:
                pass
        acked = [bool(f.is_done and f.succeeded()) for f in futures]
        fatal = next((f.exception for f in futures if f.is_done and f.failed()
                      and not isinstance(f.exception, KafkaTimeoutError)), None)
        if fatal is not None:
            self._reset(producer, fatal)
        return acked + [False] * (len(values) - len(futures))

    def close(self) -> None:
        self._closed = True
        if self.producer is not None:
            self.producer.close(timeout=self.ack_timeout_s)
            self.producer = None
        self.executor.shutdown(wait=False, cancel_futures=True)
