"""Idempotency across servers that share a store: every transaction of a batch is claimed there
before it enters the state, and its answer recorded there after.

Each server keeps its own records too (service/serving/idempotency.py): a retry on the same
server never leaves it. What the shared records add is the retry that lands on another server
(another worker, another pod). Before a batch enters the state, one call claims all of its
transaction ids (`SharedRecords.claim`; keyed hashes, never the ids in clear); the record found
decides each transaction (`verdict`):

- none: claimed now by this server — it is scored and enters the state;
- answered with the same payload: that first answer, as it was (the retry counts nothing);
- another payload (answered or in flight): refused FAILED_PRECONDITION, as on one server;
- claimed by another server with the same payload, not yet answered: refused ABORTED ("retry in
  a moment") — waiting for it would hold this server's pipeline; the retry gets the answer.

The batch is computed on a working copy first, scored, and only then written: its rows and the
records of its answers (the pipeline's, or the fallback's for those answered while queued; kept
24 h) in one script call (`FeatureEngine.compute_deferred`), so a server that dies before it
wrote neither, and one that dies after wrote both. A claim whose server died runs out after
`CLAIM_LEASE_MS` (2 s, well past any batch) and the next retry takes it over. The one window
left: when another writer changed some of the batch's rows meanwhile, the rows written in the
first round and the rest with the records in a later one are two steps (docs/state-store.md).
In a Redis Cluster rows and records are always two steps, and a write that fails on one master
may have written the others' rows: the answers' records are then saved by themselves, so a
retry gets the answer given instead of counting the transaction again on those rows.
"""

from __future__ import annotations

from typing import Protocol

import xxhash
from fraudscore.v1 import fraudscore_pb2 as pb

from core.errors import IdempotencyConflictError, InFlightElsewhereError, StateStoreUnavailableError


class ClaimTicket(Protocol):
    """A claim sent with a read: `found` once the read ran, `error` if it failed with it."""

    found: list[bytes] | None
    error: StateStoreUnavailableError | None

    def withdraw(self) -> None:
        """Not to be sent any more (the read is done, or never came)."""
        ...


class SharedRecords(Protocol):
    owner: bytes

    @property
    def atomic(self) -> bool:
        """Whether a batch's rows and records are written in one step (one Redis), or may be left
        half written by a failed write (a Cluster's masters, each written by itself)."""
        ...

    def save(self, entries: list[tuple[bytes, bytes]]) -> None:
        """Write answered records by themselves (after a Cluster's write failed part way)."""
        ...

    def claim(self, keys: list[bytes], fingerprints: list[int]) -> list[bytes]:
        ...

    def claim_ahead(self, keys: list[bytes], fingerprints: list[int]) -> ClaimTicket | None:
        """The same claim, sent with the state's next read on this thread (one round trip for
        both); None when it cannot ride on one (then `claim`)."""
        ...

    def entries(self, keys: list[bytes], fingerprints: list[int], answers: list[bytes]) -> list[tuple[bytes, bytes]]:
        ...

    def release(self, keys: list[bytes]) -> None:
        ...


def fingerprint(txn: pb.Transaction) -> int:
    """A transaction's payload fingerprint: xxh64 of its serialization. Not `deterministic=True`:
    that only orders map entries, and Transaction has no map (a test checks both give the same
    bytes: fingerprints kept in the records files must not change); 0.26 µs against 0.45."""
    return xxhash.xxh64_intdigest(txn.SerializeToString())


def verdict(found: bytes, fingerprint: int, owner: bytes) -> bytes | BaseException | None:
    """What the record found for a transaction means: None (fresh: score it), the first answer's
    bytes (a replay), or the error to answer with."""
    if not found:
        return None
    if int.from_bytes(found[1:9], "little") != fingerprint:
        return IdempotencyConflictError()
    if found[:1] == b"A":
        return found[17:]
    if found[9:17] == owner:  # this server's own claim (a batch that ran again)
        return None
    return InFlightElsewhereError()
