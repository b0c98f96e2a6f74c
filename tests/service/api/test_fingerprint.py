"""The payload fingerprint of idempotency: stable, so the fingerprints kept in the records file keep matching."""

from __future__ import annotations

import xxhash
from fraudscore.v1 import fraudscore_pb2 as pb
from hypothesis import given
from hypothesis import strategies as st

from service.serving.shared_records import fingerprint as _fingerprint

TEXT = st.text(max_size=20)
transactions = st.builds(
    pb.Transaction, transaction_id=TEXT, card_id=TEXT, customer_id=TEXT, merchant_id=TEXT, merchant_category=TEXT,
    amount_minor=st.integers(-(2**63), 2**63 - 1), currency=TEXT, event_time_ms=st.integers(-(2**63), 2**63 - 1),
    channel=st.integers(0, 4), country=TEXT, latitude=st.none() | st.floats(), longitude=st.none() | st.floats(),
    device_id=TEXT, ip_address=TEXT)


def test_transaction_has_no_map_field() -> None:
    # deterministic serialization differs only in the order of map entries
    assert not any(f.message_type is not None and f.message_type.GetOptions().map_entry
                   for f in pb.Transaction.DESCRIPTOR.fields)


@given(transactions)
def test_the_fingerprint_is_the_deterministic_serializations(txn: pb.Transaction) -> None:
    assert _fingerprint(txn) == xxhash.xxh64_intdigest(txn.SerializeToString(deterministic=True))
    assert _fingerprint(txn) == _fingerprint(pb.Transaction.FromString(txn.SerializeToString()))
