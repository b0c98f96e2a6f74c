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
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import redis
import xxhash
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.retry import Retry

from core.errors import StateStoreError, StateStoreUnavailableError
from core.features.store import ROW_LAYOUT, StoredRows

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
HOLD_MS = 500  # a hold outlives a writer that died holding it by this much, at most
HOLD_WAIT_S = 2.0  # how long a writer waits for rows another holds before giving the batch up


def namespace_for(feature_set_version: str, key_fingerprint: str) -> bytes:
    """`fs:<16 hex digits>:`, a hash of the feature set and of the identifier key's fingerprint."""
    return b"fs:" + xxhash.xxh64_hexdigest(f"{feature_set_version}\0{key_fingerprint}".encode()).encode() + b":"


def redacted(url: str) -> str:
    """`url` without its password (for logs and errors): redis://user:***@host:port/db."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


def open_redis_store(url: str, *, namespace: bytes, ttl_s: float = DEFAULT_TTL_S, timeout_s: float,
                     hold_wait_s: float) -> RedisStore:
    """A store on the Redis at `url` (redis://, rediss:// for TLS, unix://; user and password in the
    URL). Each command waits at most `timeout_s` (connecting included) and is not retried: a batch
    that cannot be served in time is answered by the fallback rules, and the next batch reconnects."""
    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                      retry=Retry(NoBackoff(), 0), health_check_interval=0)
    except ValueError as exc:  # the URL's scheme or form; its text may hold the password
        raise ValueError(f"FRAUDSCORE_STATE_URL {redacted(url)!r} is not a Redis URL: expected "
                         f"redis://[user:password@]host:port/db or rediss://… ({exc.__class__.__name__})") from None
    return RedisStore(client, namespace=namespace, ttl_s=ttl_s, hold_wait_s=hold_wait_s)


def row_dtype(num_values: int, num_tags: int) -> np.dtype:
    return np.dtype([("version", "<u8"), ("last_seen_ms", "<i8"), ("values", "<f8", (num_values,)),
                     ("tags", "<u8", (num_tags,))])


class RedisStore:
    """A `VersionedStore` on one Redis (standalone or behind a proxy that keeps scripts whole)."""

    def __init__(self, client: redis.Redis, *, namespace: bytes, ttl_s: float = DEFAULT_TTL_S,
                 hold_wait_s: float = HOLD_WAIT_S) -> None:
        if ttl_s <= 0:
            raise ValueError(f"the state TTL must be positive seconds, got {ttl_s}")
        self._hold_wait_s = hold_wait_s
        self.extra_ttl_ms = int(RECORD_TTL_S * 1000)  # `records` sets the records' TTL
        self._client = client
        self._namespace = namespace
        self._ttl_ms = int(ttl_s * 1000)
        self._dtypes = {kind: row_dtype(*layout) for kind, layout in ROW_LAYOUT.items()}
        self._cas = client.register_script(CAS_SCRIPT)
        self._hold = client.register_script(HOLD_SCRIPT)
        self._owner = os.urandom(8)  # this writer, in the holds it takes
        self._random = random.Random()

    def records(self, *, ttl_s: float) -> RedisRecords:
        """The idempotency records of the same Redis and namespace, on the same connections."""
        self.extra_ttl_ms = int(ttl_s * 1000)
        return RedisRecords(self._client, namespace=self._namespace, ttl_s=ttl_s)

    @staticmethod
    def _call(command: Any, *args: Any) -> Any:
        """`command(*args)` (a script: keys, args), with Redis's failures as StateStoreUnavailableError
        naming the class only (a server's error text may quote a key)."""
        try:
            if isinstance(command, Script):
                return command(keys=args[0], args=args[1])
            return command(*args)
        except redis.RedisError as exc:
            raise StateStoreUnavailableError(f"Redis {exc.__class__.__name__}") from exc

    def keys_of(self, kind: str, keys: np.ndarray, *, lock: bool = False) -> list[bytes]:
        prefix = self._namespace + (b"L" if lock else b"") + KIND_LETTERS[kind]
        raw = np.ascontiguousarray(keys, dtype="<u8").tobytes()
        return [prefix + raw[i:i + 8] for i in range(0, len(raw), 8)]

    def hold(self, keys: Mapping[str, np.ndarray], /) -> None:
        """Wait until this writer holds all of `keys` (for HOLD_MS, or until it writes each row):
        no other writer's compare-and-set succeeds on them meanwhile, so the next round's does.
        All or none at a time, so two writers never hold half of each other's rows; waits with
        jittered sleeps of under a millisecond, at most HOLD_WAIT_S."""
        names = [name for kind, kind_keys in keys.items() for name in self.keys_of(kind, kind_keys, lock=True)]
        if not names:
            return
        deadline = time.monotonic() + self._hold_wait_s
        while not self._call(self._hold, names, [self._owner, HOLD_MS]):
            if time.monotonic() > deadline:
                raise StateStoreUnavailableError(f"{len(names)} rows stayed held by other writers for "
                                                 f"{self._hold_wait_s} s")
            time.sleep(self._random.uniform(0.0002, 0.001))

    def fetch_versioned(self, wanted: Mapping[str, np.ndarray], /) -> dict[str, tuple[StoredRows, np.ndarray]]:
        """One MGET for every kind's keys."""
        names = {kind: self.keys_of(kind, keys) for kind, keys in wanted.items()}
        flat = [name for kind_names in names.values() for name in kind_names]
        got = self._call(self._client.mget, flat) if flat else []
        out: dict[str, tuple[StoredRows, np.ndarray]] = {}
        at = 0
        for kind, keys in wanted.items():
            values = got[at:at + len(keys)]
            at += len(keys)
            dtype = self._dtypes[kind]
            held = [i for i, v in enumerate(values) if v is not None]
            raw = b"".join(values[i] for i in held)
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
        """One script call for every kind's rows (and `extra` entries, written with them when every row
        is, kept `extra_ttl_s`); returns the keys whose version had changed."""
        names: list[bytes] = []
        versions: list[bytes] = []
        packed_rows: list[bytes] = []
        groups: list[str] = []
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
            groups.append(f"{len(stored)}:{packed.dtype.itemsize},")
            names += self.keys_of(kind, stored.keys)
            owners.append((kind, stored.keys))
        if not names and not extra:
            return {}
        changed = self._call(self._cas, names + [key for key, _ in extra],
                             [self._ttl_ms, self._owner, len(self._namespace), b"".join(versions),
                              b"".join(packed_rows), "".join(groups), len(extra), self.extra_ttl_ms,
                              *(value for _, value in extra)])
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

    def __init__(self, client: redis.Redis, *, namespace: bytes, ttl_s: float = RECORD_TTL_S,
                 lease_ms: int = CLAIM_LEASE_MS) -> None:
        self._client = client
        self._prefix = namespace + b"t"
        self._ttl_ms = int(ttl_s * 1000)
        self._lease_ms = lease_ms
        self._claim = client.register_script(CLAIM_SCRIPT)
        self._release = client.register_script(RELEASE_SCRIPT)
        self.owner = os.urandom(8)

    def claim(self, keys: list[bytes], fingerprints: list[int]) -> list[bytes]:
        """The record found for each key (b"" where there was none: claimed now by this owner)."""
        names = [self._prefix + key for key in keys]
        packed = np.asarray(fingerprints, dtype="<u8").tobytes()
        found: list[bytes] = RedisStore._call(self._claim, names, [self.owner, self._lease_ms, packed])
        return found

    def release(self, keys: list[bytes]) -> None:
        """Give up this owner's claims on `keys` (a batch that entered nothing): a retry elsewhere is
        scored at once instead of after the lease."""
        if keys:
            RedisStore._call(self._release, [self._prefix + key for key in keys], [self.owner])

    def entries(self, keys: list[bytes], fingerprints: list[int], answers: list[bytes]) -> list[tuple[bytes, bytes]]:
        """The (key, value) of each transaction's answered record, to be written with the batch's rows."""
        return [(self._prefix + key, b"A" + fingerprint.to_bytes(8, "little") + self.owner + answer)
                for key, fingerprint, answer in zip(keys, fingerprints, answers, strict=True)]
