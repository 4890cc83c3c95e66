"""The identity graph's state on disk: RocksDB (through rocksdict) with a bounded in-memory cache.

The core's graph keeps its state in the mappings of a `GraphState` (pipeline/core/identity.py); this is the one
that lives on disk, so a worker's memory is bounded by the caches and RocksDB's own buffers, not by the number of
identifiers, and a restart finds the graph where it left it (the identity log's offset is kept beside it, so only
the log's tail since then is read). One RocksDB per worker process: a worker takes the first free slot
(`<state dir>/identity/<group>/slot-N`; RocksDB's lock file tells which are taken), so two workers on one machine
each keep their own and a restarted worker finds its previous one.

Layout: one record per identifier holds everything keyed by it (first seen, person key, own facts, members when
it names a person of two or more, union-find parent), so resolving an event's identifier is one read; the other
maps (links per pair, a cluster's links, daily limits, erasures, meta) have a record per key. Values are
`marshal`led tuples, not pickles. Writes stay in the cache until `flush()` (the graph calls it once a batch, in
`take_changes`), then go in one atomic write batch, so a key written ten times in a batch is encoded and written
once, and the store on disk always holds the state at the end of a batch. The write-ahead log is off: RocksDB
then recovers from a crash to the last memtable it flushed, a consistent earlier batch with the log offset that
goes with it (one column family), and the worker reads the identity log again from that offset.
"""

from __future__ import annotations

import logging
import marshal
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from itertools import islice
from pathlib import Path
from typing import Any

from rocksdict import (
    BlockBasedOptions,
    Cache,
    Checkpoint,
    DBCompressionType,
    Options,
    Rdict,
    WriteBatch,
    WriteOptions,
)

from pipeline.core.identity import Link, PersonFacts

log = logging.getLogger("touchpoint.identity")

SLOTS = 64
_ABSENT: Any = object()  # cached "not in the store": most look-ups of a new identifier find nothing

# The fields of an identifier's record, in order, as the graph names its maps.
IDENTIFIER_FIELDS = ("first_seen", "person", "facts", "members", "cluster")
_PERSON, _FACTS, _MEMBERS = (IDENTIFIER_FIELDS.index(name) for name in ("person", "facts", "members"))
_NO_RECORD: tuple[Any, ...] = (None,) * len(IDENTIFIER_FIELDS)


def _encode_identifier(row: list[Any]) -> bytes:
    facts, members = row[_FACTS], row[_MEMBERS]
    if facts is not None:
        facts = (facts.first_seen_ms, facts.first_use_ms, tuple(facts.purchases), tuple(facts.cancels),
                 tuple(facts.contacts))
    return marshal.dumps((*row[:_FACTS], facts, None if members is None else tuple(members), *row[_MEMBERS + 1:]))


def _decode_identifier(value: bytes) -> list[Any]:
    row = list(marshal.loads(value))
    facts, members = row[_FACTS], row[_MEMBERS]
    if facts is not None:
        row[_FACTS] = PersonFacts(facts[0], facts[1], list(facts[2]), list(facts[3]), list(facts[4]))
    if members is not None:
        row[_MEMBERS] = list(members)
    return row


def _link_tuple(link: Link) -> tuple[Any, ...]:
    return link.at_ms, link.a, link.b, link.source, link.event_id


def _tuple_link(item: tuple[Any, ...]) -> Link:
    return Link(*item)


# Codecs of the other maps: (encode, decode) to and from marshal's tuples.
Codec = tuple[Callable[[Any], Any], Callable[[Any], Any]]
_SAME: Codec = (lambda value: value, lambda value: value)
_CODECS: dict[str, Codec] = {
    "links": (_link_tuple, _tuple_link),
    "cluster_links": (lambda links: tuple(map(_link_tuple, links)), lambda items: list(map(_tuple_link, items))),
    "attached": (tuple, tuple),
}


def _marshalled(encode: Callable[[Any], Any]) -> Callable[[Any], bytes]:
    return lambda value: marshal.dumps(encode(value))


def _unmarshalled(decode: Callable[[Any], Any]) -> Callable[[bytes], Any]:
    return lambda stored: decode(marshal.loads(stored))


class _Table:
    """The records of one key prefix, cached (absent keys too) with their changes until the state flushes."""

    def __init__(self, state: RocksGraphState, prefix: bytes, encode: Callable[[Any], bytes],
                 decode: Callable[[bytes], Any]) -> None:
        self._state = state
        self._db = state.db
        self.prefix = prefix
        self._encode = encode
        self._decode = decode
        self.cache: dict[str, Any] = {}
        self.dirty: set[str] = set()

    def read(self, key: str) -> Any:
        value = self.cache.get(key)  # None: not cached (a cached absence is _ABSENT)
        if value is None:
            stored = self._db.get(self.prefix + key.encode())
            value = _ABSENT if stored is None else self._decode(stored)
            self._remember(key, value)
        return value

    def write(self, key: str, value: Any) -> None:
        self.dirty.add(key)
        self._remember(key, value)

    def prefetch(self, keys: Iterable[str]) -> None:
        cache = self.cache
        missing = [key for key in keys if key not in cache]
        if missing:
            decode = self._decode
            stored = self._db.get([self.prefix + key.encode() for key in missing]) or ()
            for key, value in zip(missing, stored, strict=True):
                self._remember(key, _ABSENT if value is None else decode(value))

    def _remember(self, key: str, value: Any) -> None:
        cache = self.cache
        cache[key] = value
        if len(cache) > self._state.cache_entries:
            # Evict the oldest tenth at once (first-in-first-out costs nothing per hit); changes are written first.
            self._state.flush()
            for old in list(islice(cache, max(len(cache) // 10, 1))):
                del cache[old]

    def flush_into(self, batch: WriteBatch) -> None:
        cache, encode, prefix = self.cache, self._encode, self.prefix
        for key in self.dirty:
            value = cache[key]
            if value is _ABSENT:
                batch.delete(prefix + key.encode())
            else:
                batch.put(prefix + key.encode(), encode(value))
        self.dirty.clear()

    def stored_keys(self) -> Iterator[tuple[str, bytes]]:
        self._state.flush()
        prefix, size = self.prefix, len(self.prefix)
        stored: Iterator[tuple[bytes, bytes]] = self._db.items(from_key=prefix)  # type: ignore[assignment]
        for key, value in stored:
            if not key.startswith(prefix):
                return
            yield key[size:].decode(), value


class _Mapping(MutableMapping[str, Any]):
    """A map of the graph on a table of its own."""

    def __init__(self, table: _Table) -> None:
        self._table = table
        self._cache = table.cache

    def get(self, key: str, default: Any = None) -> Any:
        value = self._cache.get(key)
        if value is None:
            value = self._table.read(key)
        return default if value is _ABSENT else value

    def __getitem__(self, key: str) -> Any:
        value = self._table.read(key)
        if value is _ABSENT:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        return self._table.read(key) is not _ABSENT  # type: ignore[arg-type]

    def __setitem__(self, key: str, value: Any) -> None:
        self._table.write(key, value)

    def __delitem__(self, key: str) -> None:
        if key not in self:
            raise KeyError(key)
        self._table.write(key, _ABSENT)

    def pop(self, key: str, default: Any = _ABSENT) -> Any:
        value = self._table.read(key)
        if value is _ABSENT:
            if default is _ABSENT:
                raise KeyError(key)
            return default
        self._table.write(key, _ABSENT)
        return value

    def __iter__(self) -> Iterator[str]:
        return (key for key, _ in self._table.stored_keys())

    def __len__(self) -> int:  # a scan: the graph keeps its own count of identifiers
        return sum(1 for _ in self)


class _Field(MutableMapping[str, Any]):
    """One field of the identifiers' records, as a map of its own (identifier -> value, None: absent)."""

    def __init__(self, table: _Table, index: int) -> None:
        self._table = table
        self._cache = table.cache
        self._index = index

    def _row(self, key: str) -> Any:
        row = self._cache.get(key) or self._table.read(key)
        return _NO_RECORD if row is _ABSENT else row

    def get(self, key: str, default: Any = None) -> Any:
        row = self._cache.get(key) or self._table.read(key)  # the cache inline: the hot path of every event
        value = None if row is _ABSENT else row[self._index]
        return default if value is None else value

    def __getitem__(self, key: str) -> Any:
        value = self._row(key)[self._index]
        if value is None:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        return self._row(key)[self._index] is not None  # type: ignore[arg-type]

    def __setitem__(self, key: str, value: Any) -> None:
        row = self._cache.get(key) or self._table.read(key)
        if row is _ABSENT:
            row = list(_NO_RECORD)
            row[self._index] = value
            self._table.write(key, row)
        else:  # the cached row itself: marked for the next flush
            row[self._index] = value
            self._table.dirty.add(key)

    def __delitem__(self, key: str) -> None:
        if self.pop(key, None) is None:
            raise KeyError(key)

    def pop(self, key: str, default: Any = _ABSENT) -> Any:
        row = self._table.read(key)
        value = None if row is _ABSENT else row[self._index]
        if value is None:
            if default is _ABSENT:
                raise KeyError(key)
            return default
        row[self._index] = None
        self._table.write(key, row if any(field is not None for field in row) else _ABSENT)
        return value

    def note_absent(self, key: str) -> None:
        """The graph says this identifier is new: no read needed (AbsenceHint)."""
        if key not in self._table.cache:
            self._table.cache[key] = _ABSENT

    def __iter__(self) -> Iterator[str]:
        index = self._index
        return (key for key, value in self._table.stored_keys() if marshal.loads(value)[index] is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class RocksGraphState:
    """A GraphState in one RocksDB. Memory: `cache_entries` records per table, plus a 64 MiB block cache, at
    most 64 MiB of memtables (RocksDB's write buffer manager), and the SST files' index and bloom filter blocks."""

    def __init__(self, path: Path, cache_entries: int) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.cache_entries = cache_entries
        self.db = Rdict(str(path), _options())
        self._write_options = WriteOptions()
        # No write-ahead log (the module's docstring: a crash recovers an earlier batch). A property at run time.
        self._write_options.disable_wal = True  # type: ignore[method-assign,assignment]
        self._identifiers = _Table(self, b"i\x01", _encode_identifier, _decode_identifier)
        self._tables: list[_Table] = [self._identifiers]
        self._mappings: dict[str, MutableMapping[str, Any]] = {}

    def mapping(self, name: str) -> MutableMapping[str, Any]:
        if name not in self._mappings:
            if name in IDENTIFIER_FIELDS:
                self._mappings[name] = _Field(self._identifiers, IDENTIFIER_FIELDS.index(name))
            else:
                encode, decode = _CODECS.get(name, _SAME)
                table = _Table(self, name.encode() + b"\x01", _marshalled(encode), _unmarshalled(decode))
                self._tables.append(table)
                self._mappings[name] = _Mapping(table)
        return self._mappings[name]

    def prefetch(self, identifiers: Iterable[str]) -> None:
        """Read the records of a batch's identifiers, then of the persons they belong to, at once (a multi-get
        each) before the batch is enriched."""
        table = self._identifiers
        table.prefetch(identifiers)
        cache = table.cache
        table.prefetch({row[_PERSON] for row in map(cache.get, identifiers)
                        if row is not None and row is not _ABSENT and row[_PERSON] is not None})

    def flush(self) -> None:
        """Write every change since the last flush in one batch."""
        if not any(table.dirty for table in self._tables):
            return
        batch = WriteBatch(raw_mode=True)
        for table in self._tables:
            table.flush_into(batch)
        self.db.write(batch, self._write_options)

    def close(self) -> None:
        self.flush()
        self.db.flush()  # the memtables to disk: with no write-ahead log, what a clean stop must keep
        self.db.close()


def _options() -> Options:
    options = Options(raw_mode=True)
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


def seed_graph_state(source: Path, directory: Path) -> Path:
    """Give a worker that has no local store a copy of another one (a RocksDB checkpoint: the data files hard-linked
    when on the same file system), log offset included, in the first slot under `directory`: it then reads only the
    log's tail since that store's offset instead of the whole log."""
    slot = directory / "slot-0"
    directory.mkdir(parents=True, exist_ok=True)
    state = RocksGraphState(source, 1)
    try:
        Checkpoint(state.db).create_checkpoint(str(slot))
    finally:
        state.close()
    return slot
