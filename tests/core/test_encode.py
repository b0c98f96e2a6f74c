"""core.encode.KeyHasher: keyed BLAKE2b-64, checked against hashlib itself on random identifiers and keys."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.encode import DEVELOPMENT_KEY, KEY_SCHEME, KeyHasher

# database=None: no .hypothesis/ directory in the repository.
_SETTINGS = settings(max_examples=300, deadline=None, database=None)
identifiers = st.text(min_size=1, max_size=64)
secrets = st.binary(min_size=1, max_size=200)  # past 64 bytes too: those are hashed down first


def reference_key(secret: bytes, value: str) -> int:
    """The documented construction, from hashlib directly."""
    if len(secret) > 64:
        secret = hashlib.blake2b(secret, digest_size=64, person=b"fs-long-key").digest()
    digest = hashlib.blake2b(value.encode(), key=secret, digest_size=8).digest()
    return int.from_bytes(digest, "little") or 1


@_SETTINGS
@given(secret=secrets, values=st.lists(identifiers, min_size=1, max_size=20))
def test_keys_match_the_reference_implementation(secret: bytes, values: list[str]) -> None:
    hasher = KeyHasher(secret)
    expected = [reference_key(secret, v) for v in values]
    assert [hasher.key(v) for v in values] == expected
    assert hasher.keys(values).tolist() == expected
    assert hasher.keys(np.array(values * 20, dtype=object)).tolist() == expected * 20  # the deduplicated path


@_SETTINGS
@given(secret=secrets, value=identifiers)
def test_keys_are_deterministic_per_key(secret: bytes, value: str) -> None:
    # Across instances too: server, named lists and offline replay each build their own hasher.
    assert KeyHasher(secret).key(value) == KeyHasher(secret).key(value) == KeyHasher(bytes(secret)).key(value)


@_SETTINGS
@given(secrets=st.lists(secrets, min_size=2, max_size=2, unique=True), value=identifiers)
def test_keys_differ_across_secrets(secrets: list[bytes], value: str) -> None:
    # 64-bit outputs: a chance collision would take ~2^32 tries, far beyond these examples.
    a, b = (KeyHasher(s) for s in secrets)
    assert a.key(value) != b.key(value)
    assert a.fingerprint != b.fingerprint


def test_empty_identifier_is_unknown_and_no_identifier_is() -> None:
    hasher = KeyHasher(b"k" * 16)
    assert hasher.key("") == 0
    assert hasher.keys(["", "a", ""]).tolist() == [0, hasher.key("a"), 0]
    assert hasher.keys([]).dtype == np.uint64 and hasher.keys([]).shape == (0,)


def test_an_empty_secret_is_refused() -> None:
    # BLAKE2b with an empty key is the plain unkeyed hash: anyone could compute the keys.
    with pytest.raises(ValueError, match="empty"):
        KeyHasher(b"")


def test_fingerprint_identifies_the_secret_without_revealing_it() -> None:
    secret = b"0123456789abcdef-production"
    hasher = KeyHasher(secret)
    assert len(hasher.fingerprint) == 16 and int(hasher.fingerprint, 16) >= 0
    assert hasher.fingerprint == KeyHasher(secret).fingerprint
    assert secret.hex() not in hasher.fingerprint and secret.decode() not in hasher.fingerprint
    # Another personalization: not the key of any identifier, the fixed label included.
    label_key = hasher.key("fraudscore identifier key fingerprint v1")
    assert bytes.fromhex(hasher.fingerprint) != label_key.to_bytes(8, "little")
    assert hasher.scheme == KEY_SCHEME


def test_default_secret_is_the_development_key() -> None:
    assert KeyHasher().key("card_1") == KeyHasher(DEVELOPMENT_KEY).key("card_1") == reference_key(DEVELOPMENT_KEY,
                                                                                                   "card_1")


def test_the_secret_is_not_in_repr_or_attributes() -> None:
    secret = b"a-secret-that-must-not-leak"
    hasher = KeyHasher(secret)
    assert secret.decode() not in repr(hasher)
    assert not hasattr(hasher, "__dict__")  # slots only: nothing else is kept
