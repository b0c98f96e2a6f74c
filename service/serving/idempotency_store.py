"""The idempotency records on disk, beside the state snapshot: `idempotency.bin`.

What a restart must not forget: each completed Score answer (transaction_id, payload
fingerprint, the ScoreResponse) and each outcome report seen (transaction_id, whether it
counted), with its expiry in wall-clock epoch seconds. The file holds transaction ids in
clear, like the server's memory does; it lives in the state directory, whose snapshot
holds keyed hashes of card and other identifiers, and needs the same protection.

Format (little-endian), version 1:

    header   magic b"FSIDEMP\\0", u32 version, u32 sections, u64 payload bytes, u64 xxh64(payload)
    section  16-byte name ("answers", "outcomes"), u64 count, u64 id bytes, u64 answer bytes,
             u64 fingerprints[count], f64 expires_at_epoch_s[count],
             u64 id_ends[count], u64 answer_ends[count], id bytes (UTF-8), answer bytes

An answer is a serialized ScoreResponse, which is also how the cache keeps it (so a
snapshot copies bytes, and a restart puts them back, without parsing or serializing
messages); an outcome is one byte (1: it counted). A file that is damaged, cut short or of
another version is refused whole (`ValueError`, whose message never holds an identifier).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

import numpy as np
import xxhash
from fraudscore.v1 import fraudscore_pb2 as pb

from core.files import Pacer, write_atomically
from service.serving.idempotency import Remembered

RECORDS_FILE = "idempotency.bin"
FORMAT_VERSION = 1
MAGIC = b"FSIDEMP\x00"
_HEADER = struct.Struct("<8sIIQQ")
_SECTION = struct.Struct("<16sQQQ")
_SECTIONS = ("answers", "outcomes")
ENCODE_CHUNK = 2048  # records encoded between two pauses of a paced write: well under a ms
A = TypeVar("A")


@dataclass(frozen=True, slots=True)
class SavedRecords:
    """What a records file holds: Score answers (serialized ScoreResponses) and outcome reports."""

    answers: Remembered[bytes]
    outcomes: Remembered[bool]


def save_records(path: Path, *, answers: Remembered[bytes], outcomes: Remembered[bool],
                 pacer: Pacer | None = None) -> None:
    """Write the records atomically (temporary file, fsync, rename, fsync of the directory).

    The directory is synced too: the state snapshot is renamed into place after this file,
    and that order must hold after a power cut as well. Encoded and written in slices, each
    followed by `pacer.pace()` (`core.files.Pacer`: pauses that let a busy server run).
    """
    pacer = pacer or Pacer()
    pieces = [*_encode_section("answers", answers, bytes, pacer),
              *_encode_section("outcomes", outcomes, lambda counted: b"\x01" if counted else b"\x00", pacer)]
    checksum = xxhash.xxh64()
    for piece in pieces:
        checksum.update(piece)
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, len(_SECTIONS), sum(map(len, pieces)), checksum.intdigest())

    def write(f: BinaryIO) -> None:
        f.write(header)
        for piece in pieces:
            f.write(piece)

    write_atomically(path, write, sync_dir=True, pacer=pacer)


def load_records(path: Path) -> SavedRecords:
    """Read a records file; raises ValueError (saying what is wrong) for anything but an intact v1 file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read: {exc.strerror}") from None
    if len(data) < _HEADER.size:
        raise ValueError(f"truncated: {len(data)} bytes, shorter than the {_HEADER.size}-byte header")
    magic, version, sections, size, checksum = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ValueError("not an idempotency records file (wrong magic bytes)")
    if version != FORMAT_VERSION:
        raise ValueError(f"format version {version}, this server reads version {FORMAT_VERSION}")
    payload = memoryview(data)[_HEADER.size:]
    if len(payload) != size:
        raise ValueError(f"truncated or padded: {len(payload)} payload bytes, the header says {size}")
    if xxhash.xxh64_intdigest(payload) != checksum:
        raise ValueError("checksum mismatch: the file is damaged")
    if sections != len(_SECTIONS):
        raise ValueError(f"{sections} sections, expected {len(_SECTIONS)}")
    reader = _Reader(payload)
    answers = _decode_section(reader, "answers", _decode_answer)
    outcomes = _decode_section(reader, "outcomes", _decode_outcome)
    if reader.left:
        raise ValueError(f"{reader.left} bytes after the last section")
    return SavedRecords(answers, outcomes)


def _encode_section(name: str, records: Remembered[A], encode: Callable[[A], bytes], pacer: Pacer) -> list[bytes]:
    """A section's bytes, in pieces (their concatenation is the section). Python per record, so
    ENCODE_CHUNK records at a time with a `pacer.pace()` after each: no long hold of the GIL."""
    n = len(records)
    ids: list[bytes] = []
    answers: list[bytes] = []
    fingerprints: list[np.ndarray] = []
    expiry: list[np.ndarray] = []
    id_lengths: list[np.ndarray] = []
    answer_lengths: list[np.ndarray] = []
    for start in range(0, n, ENCODE_CHUNK):
        stop = min(start + ENCODE_CHUNK, n)
        chunk_ids = [txn_id.encode() for txn_id in records.transaction_ids[start:stop]]
        chunk_answers = [encode(a) for a in records.answers[start:stop]]
        ids.append(b"".join(chunk_ids))
        answers.append(b"".join(chunk_answers))
        fingerprints.append(np.fromiter(records.fingerprints[start:stop], dtype="<u8", count=stop - start))
        expiry.append(np.fromiter(records.expires_at_epoch_s[start:stop], dtype="<f8", count=stop - start))
        id_lengths.append(np.fromiter(map(len, chunk_ids), dtype="<u8", count=stop - start))
        answer_lengths.append(np.fromiter(map(len, chunk_answers), dtype="<u8", count=stop - start))
        pacer.pace()
    id_bytes, answer_bytes = sum(map(len, ids)), sum(map(len, answers))
    return [
        _SECTION.pack(name.encode(), n, id_bytes, answer_bytes),
        _joined(fingerprints, "<u8").tobytes(),
        _joined(expiry, "<f8").tobytes(),
        np.cumsum(_joined(id_lengths, "<u8"), dtype="<u8").tobytes(),
        np.cumsum(_joined(answer_lengths, "<u8"), dtype="<u8").tobytes(),
        *ids,
        *answers,
    ]


def _joined(parts: list[np.ndarray], dtype: str) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


class _Reader:
    def __init__(self, data: memoryview) -> None:
        self._data = data
        self._at = 0

    @property
    def left(self) -> int:
        return len(self._data) - self._at

    def take(self, n: int, what: str) -> memoryview:
        if n > self.left:
            raise ValueError(f"{what}: needs {n} bytes, {self.left} left")
        self._at += n
        return self._data[self._at - n:self._at]


def _decode_section(reader: _Reader, name: str, decode: Callable[[bytes], A]) -> Remembered[A]:
    raw_name, n, id_bytes, answer_bytes = _SECTION.unpack(reader.take(_SECTION.size, f"{name} section header"))
    if raw_name.rstrip(b"\x00") != name.encode():
        raise ValueError(f"expected the {name!r} section here")
    if 32 * n > reader.left:
        raise ValueError(f"{name}: {n} records cannot fit in {reader.left} bytes")
    fingerprints = np.frombuffer(reader.take(8 * n, f"{name} fingerprints"), dtype="<u8").tolist()
    expires = np.frombuffer(reader.take(8 * n, f"{name} expiry times"), dtype="<f8")
    id_ends = np.frombuffer(reader.take(8 * n, f"{name} id offsets"), dtype="<u8")
    answer_ends = np.frombuffer(reader.take(8 * n, f"{name} answer offsets"), dtype="<u8")
    ids = bytes(reader.take(id_bytes, f"{name} ids"))
    answers = bytes(reader.take(answer_bytes, f"{name} answers"))
    if not np.all(np.isfinite(expires)):
        raise ValueError(f"{name}: an expiry time is not finite")
    for ends, total, what in ((id_ends, id_bytes, "id"), (answer_ends, answer_bytes, "answer")):
        if n and (bool(np.any(ends[1:] < ends[:-1])) or int(ends[-1]) != total):
            raise ValueError(f"{name}: {what} offsets do not describe the {what} bytes")
    txn_ids: list[str] = []
    decoded: list[A] = []
    id_start = answer_start = 0
    for id_end, answer_end in zip(id_ends.tolist(), answer_ends.tolist(), strict=True):
        try:
            txn_ids.append(ids[id_start:id_end].decode())
        except UnicodeDecodeError:
            raise ValueError(f"{name}: a transaction id is not UTF-8") from None
        decoded.append(decode(answers[answer_start:answer_end]))
        id_start, answer_start = id_end, answer_end
    return Remembered(txn_ids, fingerprints, expires.tolist(), decoded)


def _decode_answer(raw: bytes) -> bytes:
    # Parsed once to refuse a file whose answers would fail a retry later; kept serialized.
    try:
        pb.ScoreResponse.FromString(raw)
    except Exception:  # protobuf's DecodeError, whose text we do not pass on
        raise ValueError("answers: a ScoreResponse does not parse") from None
    return raw


def _decode_outcome(raw: bytes) -> bool:
    if raw not in (b"\x00", b"\x01"):
        raise ValueError("outcomes: a record is not one byte 0 or 1")
    return raw == b"\x01"
