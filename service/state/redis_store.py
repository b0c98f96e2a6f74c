"""Entity rows in Redis: one string per entity, versioned, written by compare-and-set.

A row is stored as its bytes: version (uint64), last_seen_ms (int64), the kind's V values
(float64) and T tags (uint64), little-endian — the kernels' own numbers, bit for bit, so a
row read back is exactly the row written (floats never pass through text). Keys are
`<namespace><kind letter><8 key bytes>`: the namespace names the feature set and the
identifier key (`namespace_for`), so servers of another feature set or hash key read
nothing rather than each other's rows.

Reads are one MGET; writes one script call that, per row, compares the stored version with
the one read and writes the new row only where they match (`core.features.store.VersionedStore`).
Every write refreshes the key's TTL: an entity not seen for `ttl_ms` expires, as one evicted
from the local tables comes back new. The client is redis-py's blocking one, called from the
pipeline thread (which waits on the socket with the GIL released); docs/state-store.md says why.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import numpy as np
import redis
import xxhash
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.retry import Retry
from redis.sentinel import Sentinel

from core.errors import StateStoreError, StateStoreUnavailableError
from core.features.store import ROW_LAYOUT, StoredRows
from service.state.redis_nodes import Cluster, Standalone

KIND_LETTERS = {"card": b"c", "merchant": b"m", "customer": b"u", "device": b"d", "ip": b"i"}
DEFAULT_TTL_S = 35 * 24 * 3600.0  # the longest feature window (30 days) and some margin

# Per row KEYS[i]: the stored version must equal the one read (8 zero bytes: the key must be
# absent) and the row must not be held by another writer (`hold`: its lock is the key with "L"
# after the namespace). Rows that fail are returned (1-based) and left alone; a row written drops
# this writer's hold on it. The arguments are packed (one string of versions, one of rows, and
# "count:size," per kind): a few arguments instead of two per row, which redis-py would encode
# one by one. allow-cross-slot-keys: in a Cluster, one call per node may hold keys of many slots
# (Redis 7.0+, Valkey 7.2+).
CAS_SCRIPT = """#!lua flags=allow-cross-slot-keys
local ttl, owner, prefix = ARGV[1], ARGV[2], tonumber(ARGV[3])
local versions, rows = ARGV[4], ARGV[5]
local absent = string.rep('\\0', 8)
-- The last `extras` keys are the caller's entries (ARGV[9…]), written only if every row is.
local extras, extra_ttl = tonumber(ARGV[7]), ARGV[8]
local n = #KEYS - extras
-- Every row and every hold read first, a few MGETs rather than two GETs a row.
local current, holders = {}, {}
for first = 1, n, 1000 do
  local last = math.min(first + 999, n)
  local locks = {}
  for i = first, last do
    locks[#locks + 1] = string.sub(KEYS[i], 1, prefix) .. 'L' .. string.sub(KEYS[i], prefix + 1)
  end
  local got = redis.call('MGET', unpack(KEYS, first, last))
  local held = redis.call('MGET', unpack(locks))
  for k = 1, last - first + 1 do
    current[first + k - 1], holders[first + k - 1] = got[k], held[k]
  end
end
local changed = {}
local i, at = 0, 1
for count, size in string.gmatch(ARGV[6], '(%d+):(%d+),') do
  count, size = tonumber(count), tonumber(size)
  for _ = 1, count do
    i = i + 1
    local expected = string.sub(versions, 8 * i - 7, 8 * i)
    local row, holder = current[i], holders[i]
    if (holder == false or holder == owner)
        and ((row == false and expected == absent) or (row and string.sub(row, 1, 8) == expected)) then
      redis.call('SET', KEYS[i], string.sub(rows, at, at + size - 1), 'PX', ttl)
      if holder then
        redis.call('DEL', string.sub(KEYS[i], 1, prefix) .. 'L' .. string.sub(KEYS[i], prefix + 1))
      end
    else
      changed[#changed + 1] = i
    end
    at = at + size
  end
end
if #changed == 0 then
  for e = 1, extras do
    redis.call('SET', KEYS[n + e], ARGV[8 + e], 'PX', extra_ttl)
  end
end
return changed
"""

# All of KEYS (locks) for ARGV[1] for ARGV[2] ms, or none when another writer holds any (1 / 0).
HOLD_SCRIPT = """#!lua flags=allow-cross-slot-keys
for i = 1, #KEYS do
  local holder = redis.call('GET', KEYS[i])
  if holder and holder ~= ARGV[1] then
    return 0
  end
end
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], ARGV[1], 'PX', ARGV[2])
end
return 1
"""
# Drop the holds among KEYS that ARGV[1] has (a Cluster's writer that got only part of its holds).
UNHOLD_SCRIPT = """#!lua flags=allow-cross-slot-keys
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('DEL', KEYS[i])
  end
end
return 0
"""
HOLD_MS = 500  # a hold outlives a writer that died holding it by this much, at most
HOLD_WAIT_S = 2.0  # how long a writer waits for rows another holds before giving the batch up


def namespace_for(feature_set_version: str, key_fingerprint: str) -> bytes:
    """`fs:<16 hex digits>:`, a hash of the feature set and of the identifier key's fingerprint."""
    return b"fs:" + xxhash.xxh64_hexdigest(f"{feature_set_version}\0{key_fingerprint}".encode()).encode() + b":"


URL_FORMS = ("redis://[user:password@]host:port/db, rediss://… (TLS), unix:///path.sock, "
             "redis+cluster://[user:password@]host:port[,host:port…] (rediss+cluster:// for TLS) or "
             "redis+sentinel://[user:password@]host:port[,host:port…]/master-name[/db] (rediss+sentinel://)")
# TLS settings a Cluster or Sentinel URL may carry as query parameters (?ssl_ca_certs=/path…);
# redis:// and rediss:// take redis-py's own query parameters.
TLS_PARAMETERS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")


def redacted(url: str) -> str:
    """`url` without its password (for logs and errors): redis://user:***@host:port/db."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hosts = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{hosts}"


def _hosts(url: str) -> tuple[str | None, str | None, list[tuple[str, int]], str, dict[str, str]]:
    """user, password, [(host, port)…], path and query of a multi-host URL."""
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    nodes = []
    for item in filter(None, hosts.split(",")):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"FRAUDSCORE_STATE_URL {redacted(url)!r}: {item!r} is not host:port")
        nodes.append((host.strip("[]"), int(port)))
    if not nodes:
        raise ValueError(f"FRAUDSCORE_STATE_URL {redacted(url)!r} names no host:port")
    query = dict(parse_qsl(parts.query))
    unknown = sorted(set(query) - set(TLS_PARAMETERS))
    if unknown:
        raise ValueError(f"FRAUDSCORE_STATE_URL {redacted(url)!r}: unknown parameter {unknown[0]!r}; expected "
                         f"{', '.join(TLS_PARAMETERS)}")
    return unquote(user) or None, unquote(password) or None, nodes, parts.path, query


def open_redis_store(url: str, *, namespace: bytes, ttl_s: float = DEFAULT_TTL_S, timeout_s: float,
                     hold_wait_s: float, ca_file: Path | None = None) -> RedisStore:
    """A store on the Redis at `url` (URL_FORMS; user and password in the URL). Each command waits
    at most `timeout_s` (connecting included) and is not retried: a batch that cannot be served in
    time is answered by the fallback rules, and the next batch reconnects (in a Cluster, reads the
    slot map again; behind Sentinel, asks the sentinels for the master again). `ca_file`: the CA
    that signed a TLS Redis's certificate."""
    timeouts: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s,
                                "retry": Retry(NoBackoff(), 0), "health_check_interval": 0}
    scheme = url.partition("://")[0]
    ca = {"ssl_ca_certs": str(ca_file)} if ca_file is not None and scheme.startswith("rediss") else {}
    if scheme in ("redis+cluster", "rediss+cluster", "redis+sentinel", "rediss+sentinel"):
        user, password, nodes, path, tls = _hosts(url)
        # The URL's own ?ssl_ca_certs= wins over FRAUDSCORE_STATE_CA_FILE.
        connection = {**timeouts, "username": user, "password": password,
                      **({"ssl": True, **ca, **tls} if scheme.startswith("rediss") else {})}
        if scheme.endswith("cluster"):
            return RedisStore(Cluster(nodes, **connection), namespace=namespace, ttl_s=ttl_s, hold_wait_s=hold_wait_s)
        name, _, db = path.strip("/").partition("/")
        if not name or (db and not db.isdigit()):
            raise ValueError(f"FRAUDSCORE_STATE_URL {redacted(url)!r}: a Sentinel URL ends /master-name[/db], "
                             f"as in redis+sentinel://sentinel-1:26379,sentinel-2:26379/mymaster/0")
        # The sentinels are asked with the same credentials and TLS (a Sentinel set up with
        # requirepass, as managed ones are); the master they name is then connected to.
        sentinels: Any = Sentinel(nodes, sentinel_kwargs=connection, **connection)  # type: ignore[no-untyped-call]
        return RedisStore(Standalone(sentinels.master_for(name, db=int(db or 0))), namespace=namespace, ttl_s=ttl_s,
                          hold_wait_s=hold_wait_s)
    try:
        client = redis.Redis.from_url(url, **timeouts, **ca)
    except ValueError as exc:  # the URL's scheme or form; its text may hold the password
        raise ValueError(f"FRAUDSCORE_STATE_URL {redacted(url)!r} is not a Redis URL: expected "
                         f"{URL_FORMS} ({exc.__class__.__name__})") from None
    return RedisStore(client, namespace=namespace, ttl_s=ttl_s, hold_wait_s=hold_wait_s)


def row_dtype(num_values: int, num_tags: int) -> np.dtype:
    return np.dtype([("version", "<u8"), ("last_seen_ms", "<i8"), ("values", "<f8", (num_values,)),
                     ("tags", "<u8", (num_tags,))])


class RedisStore:
    """A `VersionedStore` on one Redis (standalone, a Sentinel's master) or a Redis Cluster."""

    def __init__(self, nodes: redis.Redis | Standalone | Cluster, *, namespace: bytes, ttl_s: float = DEFAULT_TTL_S,
                 hold_wait_s: float = HOLD_WAIT_S) -> None:
        if ttl_s <= 0:
            raise ValueError(f"the state TTL must be positive seconds, got {ttl_s}")
        self._nodes = Standalone(nodes) if isinstance(nodes, redis.Redis) else nodes
        self._hold_wait_s = hold_wait_s
        self.extra_ttl_ms = int(RECORD_TTL_S * 1000)  # `records` sets the records' TTL
        self._namespace = namespace
        self._ttl_ms = int(ttl_s * 1000)
        self._dtypes = {kind: row_dtype(*layout) for kind, layout in ROW_LAYOUT.items()}
        self._cas = self._nodes.register(CAS_SCRIPT)
        self._hold = self._nodes.register(HOLD_SCRIPT)
        self._unhold = self._nodes.register(UNHOLD_SCRIPT)
        self._owner = os.urandom(8)  # this writer, in the holds it takes
        self._random = random.Random()
        self._ahead = threading.local()  # a claim to send with this thread's next read (`ClaimAhead`)

    @property
    def nodes(self) -> Standalone | Cluster:
        return self._nodes

    @property
    def namespace(self) -> bytes:
        return self._namespace

    def records(self, *, ttl_s: float) -> RedisRecords:
        """The idempotency records of the same Redis and namespace, on the same connections; their
        claims can ride on this store's next read (`RedisRecords.claim_ahead`)."""
        self.extra_ttl_ms = int(ttl_s * 1000)
        return RedisRecords(self._nodes, namespace=self._namespace, ttl_s=ttl_s, store=self)

    def send_with_next_read(self, ticket: ClaimAhead | None) -> None:
        """`ticket`'s claim goes out with this thread's next `fetch_versioned` (None: no longer)."""
        self._ahead.ticket = ticket

    def keys_of(self, kind: str, keys: np.ndarray, *, lock: bool = False) -> list[bytes]:
        """`<namespace>[L]{<kind letter><16 hex digits>}`: the braces are a Cluster hash tag, so a row and
        its hold share a slot (hex, because raw key bytes could hold a brace)."""
        prefix = self._namespace + (b"L{" if lock else b"{") + KIND_LETTERS[kind]
        digits = np.ascontiguousarray(keys, dtype="<u8").tobytes().hex().encode()
        return [prefix + digits[i:i + 16] + b"}" for i in range(0, len(digits), 16)]

    def hold(self, keys: Mapping[str, np.ndarray], /) -> None:
        """Wait until this writer holds all of `keys` (for HOLD_MS, or until it writes each row):
        no other writer's compare-and-set succeeds on them meanwhile, so the next round's does.
        All or none at a time, so two writers never hold half of each other's rows (in a Cluster,
        where holds are taken per slot, the part taken is given back when any is refused); waits
        with jittered sleeps of under a millisecond, at most HOLD_WAIT_S."""
        names = [name for kind, kind_keys in keys.items() for name in self.keys_of(kind, kind_keys, lock=True)]
        if not names:
            return
        deadline = time.monotonic() + self._hold_wait_s
        while True:
            replies = self._nodes.script(self._hold, names, lambda _: [self._owner, HOLD_MS])
            if all(got for _, got in replies):
                return
            taken = [names[i] for idx, got in replies if got for i in idx]
            if taken:
                self._nodes.script(self._unhold, taken, lambda _: [self._owner])
            if time.monotonic() > deadline:
                raise StateStoreUnavailableError(f"{len(names)} rows stayed held by other writers for "
                                                 f"{self._hold_wait_s} s")
            time.sleep(self._random.uniform(0.0002, 0.001))

    def fetch_versioned(self, wanted: Mapping[str, np.ndarray], /) -> dict[str, tuple[StoredRows, np.ndarray]]:
        """One MGET for every kind's keys (a Cluster: one pipeline of GETs per master)."""
        names = {kind: self.keys_of(kind, keys) for kind, keys in wanted.items()}
        flat = [name for kind_names in names.values() for name in kind_names]
        ticket: ClaimAhead | None = getattr(self._ahead, "ticket", None)
        if ticket is None:
            got = self._nodes.get(flat)
        else:
            self._ahead.ticket = None
            try:
                claimed, got = self._nodes.script_and_get(ticket.script, ticket.names, ticket.args_for, flat)
            except StateStoreUnavailableError as exc:
                ticket.error = exc
                raise
            ticket.answer(claimed)
        out: dict[str, tuple[StoredRows, np.ndarray]] = {}
        at = 0
        for kind, keys in wanted.items():
            values = got[at:at + len(keys)]
            at += len(keys)
            dtype = self._dtypes[kind]
            held = [i for i, v in enumerate(values) if v is not None]
            raw = b"".join(values[i] for i in held)  # type: ignore[misc]
            if len(raw) != dtype.itemsize * len(held):
                raise StateStoreError(kind, f"rows in Redis are not {dtype.itemsize} bytes each: another "
                                            "feature set's, or not written by fraudscore")
            rows = np.frombuffer(raw, dtype=dtype)
            out[kind] = (StoredRows(np.asarray(keys, dtype=np.uint64)[held], rows["last_seen_ms"].astype(np.int64),
                                    rows["values"].astype(np.float64), rows["tags"].astype(np.uint64)),
                         rows["version"].astype(np.uint64))
        return out

    def store_if_unchanged(self, rows: Mapping[str, tuple[StoredRows, np.ndarray]],
                           extra: Sequence[tuple[bytes, bytes]] = (), /) -> dict[str, np.ndarray]:
        """Every kind's rows by compare-and-set, and `extra` entries (kept `extra_ttl_s`) written when
        every row is; returns the keys whose version had changed. One script call on one Redis, rows
        and entries together; in a Cluster one per hash slot, and the entries after every row."""
        names: list[bytes] = []
        versions: list[bytes] = []
        packed_rows: list[bytes] = []
        sizes: list[int] = []
        owners: list[tuple[str, np.ndarray]] = []
        for kind, (stored, expected) in rows.items():
            if not len(stored):
                continue
            packed = np.empty(len(stored), dtype=self._dtypes[kind])
            packed["version"] = expected + np.uint64(1)
            packed["last_seen_ms"] = stored.last_seen_ms
            packed["values"] = stored.values
            packed["tags"] = stored.tags
            packed_rows.append(packed.tobytes())
            versions.append(np.ascontiguousarray(expected, dtype="<u8").tobytes())
            sizes += [packed.dtype.itemsize] * len(stored)
            names += self.keys_of(kind, stored.keys)
            owners.append((kind, stored.keys))
        if not names and not extra:
            return {}
        all_versions, all_rows = b"".join(versions), b"".join(packed_rows)
        if self._nodes.atomic:
            groups = "".join(f"{len(keys)}:{self._dtypes[kind].itemsize}," for kind, keys in owners)
            replies = self._nodes.script(self._cas, names + [key for key, _ in extra], lambda _: [
                self._ttl_ms, self._owner, len(self._namespace), all_versions, all_rows, groups, len(extra),
                self.extra_ttl_ms, *(value for _, value in extra)])
        else:
            starts = np.concatenate([[0], np.cumsum(sizes)]).tolist() if sizes else [0]

            def args_for(idx: Sequence[int]) -> list[Any]:
                groups = "".join(f"1:{sizes[i]}," for i in idx)
                return [self._ttl_ms, self._owner, len(self._namespace),
                        b"".join(all_versions[8 * i:8 * i + 8] for i in idx),
                        b"".join(all_rows[starts[i]:starts[i + 1]] for i in idx), groups, 0, 0]

            replies = self._nodes.script(self._cas, names, args_for) if names else []
        changed = [idx[j - 1] + 1 for idx, reply in replies for j in reply]
        if not changed and extra and not self._nodes.atomic:
            self._nodes.set(extra, self.extra_ttl_ms)
        out: dict[str, np.ndarray] = {}
        if changed:
            flat_kinds = np.concatenate([np.full(len(keys), k, dtype=np.int64) for k, (_, keys) in enumerate(owners)])
            flat_keys = np.concatenate([keys for _, keys in owners])
            at = np.asarray(changed, dtype=np.int64) - 1
            for k, (kind, _) in enumerate(owners):
                mine = at[flat_kinds[at] == k]
                if mine.size:
                    out[kind] = flat_keys[mine].astype(np.uint64)
        return out


# Idempotency records shared by every server (service/serving/shared_records.py says how they are
# used). A record is b"C" (claimed: being answered) or b"A" (answered), the payload fingerprint
# (8 bytes), the owner (8 bytes), and after b"A" the serialized answer. Per key: an existing
# record is returned as it is; a missing one becomes this owner's claim for ARGV[2] ms and ''
# is returned. One call for a batch.
CLAIM_SCRIPT = """#!lua flags=allow-cross-slot-keys
local owner, lease, fingerprints = ARGV[1], ARGV[2], ARGV[3]
local found = redis.call('MGET', unpack(KEYS))
local out = {}
for i = 1, #KEYS do
  if found[i] then
    out[i] = found[i]
  else
    redis.call('SET', KEYS[i], 'C' .. string.sub(fingerprints, 8 * i - 7, 8 * i) .. owner, 'PX', lease)
    out[i] = ''
  end
end
return out
"""
# Drop this owner's claims (those still claims: an answered record stays).
RELEASE_SCRIPT = """#!lua flags=allow-cross-slot-keys
local found = redis.call('MGET', unpack(KEYS))
for i = 1, #KEYS do
  if found[i] and string.sub(found[i], 1, 1) == 'C' and string.sub(found[i], 10, 17) == ARGV[1] then
    redis.call('DEL', KEYS[i])
  end
end
return 0
"""
CLAIM_LEASE_MS = 2_000  # a claim whose server died is taken over this long after it was made
RECORD_TTL_S = 24 * 3600.0


class RedisRecords:
    """Idempotency records in Redis: claim a batch's transactions, record their answers."""

    def __init__(self, nodes: redis.Redis | Standalone | Cluster, *, namespace: bytes, ttl_s: float = RECORD_TTL_S,
                 lease_ms: int = CLAIM_LEASE_MS, store: RedisStore | None = None) -> None:
        self._nodes = Standalone(nodes) if isinstance(nodes, redis.Redis) else nodes
        self._store = store
        self._prefix = namespace + b"t"
        self._ttl_ms = int(ttl_s * 1000)
        self._lease_ms = lease_ms
        self._claim = self._nodes.register(CLAIM_SCRIPT)
        self._release = self._nodes.register(RELEASE_SCRIPT)
        self.owner = os.urandom(8)

    def claim(self, keys: list[bytes], fingerprints: list[int]) -> list[bytes]:
        """The record found for each key (b"" where there was none: claimed now by this owner)."""
        ticket = self._ticket(keys, fingerprints)
        ticket.answer(self._nodes.script(self._claim, ticket.names, ticket.args_for))
        assert ticket.found is not None
        return ticket.found

    def claim_ahead(self, keys: list[bytes], fingerprints: list[int]) -> ClaimAhead | None:
        """The same claim, sent with the store's next read on this thread (one round trip for both);
        the ticket holds what was found once that read has run. None: not tied to a store (claim)."""
        if self._store is None:
            return None
        ticket = self._ticket(keys, fingerprints)
        self._store.send_with_next_read(ticket)
        return ticket

    def _ticket(self, keys: list[bytes], fingerprints: list[int]) -> ClaimAhead:
        packed = np.asarray(fingerprints, dtype="<u8").tobytes()
        return ClaimAhead(self._claim, [self._prefix + key for key in keys], lambda idx: [
            self.owner, self._lease_ms,
            packed if len(idx) == len(keys) else b"".join(packed[8 * i:8 * i + 8] for i in idx)], self._store)

    @property
    def atomic(self) -> bool:
        return self._nodes.atomic

    def save(self, entries: list[tuple[bytes, bytes]]) -> None:
        """Answered records written by themselves (`entries`), kept the records' TTL."""
        if entries:
            self._nodes.set(entries, self._ttl_ms)

    def release(self, keys: list[bytes]) -> None:
        """Give up this owner's claims on `keys` (a batch that entered nothing): a retry elsewhere is
        scored at once instead of after the lease."""
        if keys:
            self._nodes.script(self._release, [self._prefix + key for key in keys], lambda _: [self.owner])

    def entries(self, keys: list[bytes], fingerprints: list[int], answers: list[bytes]) -> list[tuple[bytes, bytes]]:
        """The (key, value) of each transaction's answered record, to be written with the batch's rows."""
        return [(self._prefix + key, b"A" + fingerprint.to_bytes(8, "little") + self.owner + answer)
                for key, fingerprint, answer in zip(keys, fingerprints, answers, strict=True)]


class ClaimAhead:
    """A batch's claim waiting to ride on the store's next read (`RedisRecords.claim_ahead`)."""

    def __init__(self, script: Script, names: list[bytes], args_for: Callable[[Sequence[int]], list[Any]],
                 store: RedisStore | None) -> None:
        self.script, self.names, self.args_for, self._store = script, names, args_for, store
        self.found: list[bytes] | None = None
        self.error: StateStoreUnavailableError | None = None

    def answer(self, replies: list[tuple[Sequence[int], Any]]) -> None:
        found: list[bytes] = [b""] * len(self.names)
        for idx, reply in replies:
            for i, record in zip(idx, reply, strict=True):
                found[i] = record
        self.found = found

    def withdraw(self) -> None:
        """Not to be sent any more (the batch is done with its read, or never made one)."""
        if self._store is not None:
            self._store.send_with_next_read(None)
