"""The identity graph's state on disk: RocksDB (through rocksdict) with a bounded in-memory cache per mapping.

The core's graph keeps its state in the mappings of a `GraphState` (pipeline/core/identity.py); this is the one
that lives on disk, so a worker's memory is bounded by the caches and RocksDB's own buffers, not by the number of
identifiers, and a restart finds the graph where it left it (the identity log's offset is kept beside it, so only
the log's tail since then is read). One RocksDB per worker process: a worker takes the first free slot
(`<state dir>/identity/<group>/slot-N`; RocksDB's lock file tells which are taken), so two workers on one machine
each keep their own and a restarted worker finds its previous one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, MutableMapping
from itertools import islice
from pathlib import Path
from typing import Any

from rocksdict import BlockBasedOptions, Cache, DBCompressionType, Options, Rdict

log = logging.getLogger("touchpoint.identity")

_MISSING = object()  # cached "not in the store": most look-ups of a lone identifier find nothing
SLOTS = 64


class CachedMapping(MutableMapping[str, Any]):
    """One named mapping of the store (its keys share a prefix), with a cache of at most `cache_entries` keys,
    absent keys included. Writes go through to RocksDB at once. When full, the oldest tenth of the cache is
    dropped at once: first-in-first-out costs nothing per hit, where least-recently-used would cost a move each."""

    def __init__(self, db: Rdict, name: str, cache_entries: int) -> None:
        self._db = db
        self._prefix = name + "\x01"
        self._cache: dict[str, Any] = {}
        self._limit = cache_entries

    def _remember(self, key: str, value: Any) -> None:
        cache = self._cache
        cache[key] = value
        if len(cache) > self._limit:
            for old in list(islice(cache, max(len(cache) // 10, 1))):
                del cache[old]

    def __getitem__(self, key: str) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        value = self._cache.get(key, _MISSING)
        if value is _MISSING:
            stored = self._db.get(self._prefix + key)
            value = _ABSENT if stored is None else stored
            self._remember(key, value)
        return default if value is _ABSENT else value

    def note_absent(self, key: str) -> None:
        self._remember(key, _ABSENT)

    def __contains__(self, key: object) -> bool:
        value = self._cache.get(key, _MISSING)  # type: ignore[call-overload]
        if value is _MISSING:
            return self.get(key, _MISSING) is not _MISSING  # type: ignore[arg-type]
        return value is not _ABSENT

    def __setitem__(self, key: str, value: Any) -> None:
        self._db[self._prefix + key] = value
        self._remember(key, value)

    def __delitem__(self, key: str) -> None:
        if key not in self:
            raise KeyError(key)
        del self._db[self._prefix + key]
        self._remember(key, _ABSENT)

    def pop(self, key: str, default: Any = _MISSING) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise KeyError(key)
            return default
        del self._db[self._prefix + key]
        self._remember(key, _ABSENT)
        return value

    def __iter__(self) -> Iterator[str]:
        prefix, size = self._prefix, len(self._prefix)
        for key in self._db.keys(from_key=prefix):
            if not isinstance(key, str) or not key.startswith(prefix):
                return
            yield key[size:]

    def __len__(self) -> int:  # a scan: the graph keeps its own count of identifiers
        return sum(1 for _ in self)


class _Absent:
    __slots__ = ()


_ABSENT = _Absent()


class RocksGraphState:
    """A GraphState in one RocksDB. Memory: `cache_entries` per mapping, plus a 64 MiB block cache, at most
    64 MiB of memtables (RocksDB's write buffer manager), and the SST files' index and bloom filter blocks."""

    def __init__(self, path: Path, cache_entries: int) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._cache_entries = cache_entries
        self._db = Rdict(str(path), _options())
        self._mappings: dict[str, CachedMapping] = {}

    def mapping(self, name: str) -> MutableMapping[str, Any]:
        if name not in self._mappings:
            self._mappings[name] = CachedMapping(self._db, name, self._cache_entries)
        return self._mappings[name]

    def close(self) -> None:
        self._db.flush()
        self._db.close()


def _options() -> Options:
    options = Options()
    options.create_if_missing(True)
    options.set_write_buffer_size(16 * 1024 * 1024)
    options.set_max_write_buffer_number(2)
    options.set_db_write_buffer_size(64 * 1024 * 1024)
    options.set_compression_type(DBCompressionType.lz4())
    table = BlockBasedOptions()
    table.set_block_cache(Cache(64 * 1024 * 1024))
    table.set_bloom_filter(10, False)  # a look-up of an identifier the store does not hold rarely reads a block
    # Index and filter blocks stay outside the block cache (~1.3 bytes per key for the filters): charged to it
    # (cache_index_and_filter_blocks) they were evicted by data blocks and every get re-read them, measured 15x
    # slower at 300k identifiers. See docs/scale.md for what that costs at 100M.
    options.set_block_based_table_factory(table)
    return options


def open_graph_state(directory: Path, cache_entries: int) -> RocksGraphState:
    """The first slot under `directory` that no other process holds."""
    last_error: Exception | None = None
    for slot in range(SLOTS):
        try:
            state = RocksGraphState(directory / f"slot-{slot}", cache_entries)
        except Exception as exc:  # rocksdict raises a bare Exception naming the lock when another process has it
            if "lock" not in str(exc).lower():
                raise
            last_error = exc
            continue
        log.info("Identity graph store: %s", state.path)
        return state
    raise RuntimeError(f"every identity store slot under {directory} is held by another process: {last_error}")
