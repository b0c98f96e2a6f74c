"""Named lists of a rules file (allowlists, blocklists), loaded and hashed once, at load.

    "lists": {
      "blocked_cards": {"kind": "card", "file": "lists/blocked_cards.txt"},
      "vip_merchants": {"kind": "merchant", "values": ["m_1", "m_2"]},
      "risky_countries": {"kind": "country", "values": ["KP", "IR"]},
      "risky_mccs": {"kind": "merchant_category", "values": ["7995", "5967"]}
    }

A card, customer, merchant, device or ip list holds identifiers, hashed here with the service's
`KeyHasher` (so a list matches exactly the keys the pipeline computes, and no identifier is held in
clear past load). A country list holds ISO alpha-2 codes, a merchant_category list MCCs, both kept
as the numeric codes core.encode makes. A file (path relative to the rules file) holds one value a
line; blank lines and lines starting with `#` are skipped. Card numbers never enter fraudscore: a
value that looks like a PAN is refused, and so is an empty one.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from core.encode import EncodedBatch, KeyHasher, country_code, mcc_code
from core.identifiers import looks_like_pan
from core.rules.lang import NamedList
from core.rules.lang.nodes import IDENTIFIERS

CODE_KINDS = ("merchant_category",)  # lists of a numeric column's codes
LIST_KINDS = (*IDENTIFIERS, *CODE_KINDS)
_HASHED = frozenset(IDENTIFIERS) - {"country"}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def load_lists(raw: Any, *, base_dir: Path,
               hasher: KeyHasher) -> tuple[dict[str, NamedList], tuple[tuple[Path, str], ...]]:
    """The lists of a rules file's "lists" object, and the files read, each with the sha256 of the
    content read (so a reload can tell when one changes after load, without a window between).

    Raises ValueError naming the list (and the file and line) and what was wrong."""
    if not isinstance(raw, dict):
        raise ValueError("\"lists\" must be an object of named lists, such as "
                         "{\"blocked_cards\": {\"kind\": \"card\", \"file\": \"blocked_cards.txt\"}}")
    lists: dict[str, NamedList] = {}
    files: list[tuple[Path, str]] = []
    for name, spec in raw.items():
        where = f"list {name!r}"
        if not _NAME.match(name):
            raise ValueError(f"{where}: a list's name is letters, digits and '_' (rules refer to it as @name)")
        if not isinstance(spec, dict) or set(spec) - {"kind", "file", "values", "note"} or (
                ("file" in spec) == ("values" in spec)):
            raise ValueError(f"{where}: expected {{\"kind\", and \"file\" or \"values\" (one of them), "
                             f"optional \"note\"}}, got {sorted(spec) if isinstance(spec, dict) else spec!r}")
        kind = spec.get("kind")
        if kind not in LIST_KINDS:
            raise ValueError(f"{where}: kind must be one of {', '.join(LIST_KINDS)}, got {kind!r}")
        if "file" in spec:
            if not isinstance(spec["file"], str) or not spec["file"]:
                raise ValueError(f"{where}: \"file\" must be a path (relative to the rules file)")
            path = base_dir / spec["file"]
            digest, values = _read(path, where)
            files.append((path, digest))
        else:
            raw_values = spec["values"]
            if not isinstance(raw_values, list) or not all(isinstance(v, str) for v in raw_values):
                raise ValueError(f"{where}: \"values\" must be a list of strings")
            values = [(f"value {i}", v.strip()) for i, v in enumerate(raw_values)]  # as file lines are
        lists[name] = NamedList(name, kind, _encode(values, kind, where, hasher))
    return lists, tuple(files)


def _read(path: Path, where: str) -> tuple[str, list[tuple[str, str]]]:
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ValueError(f"{where}: cannot read file {path}: {why}") from None
    values = []
    for number, line in enumerate(text.splitlines(), start=1):
        value = line.strip()
        if value and not value.startswith("#"):
            values.append((f"file {path}, line {number}", value))
    return hashlib.sha256(data).hexdigest(), values


def _encode(values: list[tuple[str, str]], kind: str, where: str, hasher: KeyHasher) -> np.ndarray:
    out: list[int] = []
    for at, value in values:
        # The value itself is never in the message: it may be an identifier, or worse, a card number.
        if not value.strip():
            raise ValueError(f"{where}, {at}: empty value")
        if kind in _HASHED:
            if looks_like_pan(value):
                raise ValueError(f"{where}, {at}: looks like a card number (PAN); lists hold the tokens the "
                                 "service receives as card_id, never card numbers")
            out.append(hasher.key(value))
        elif kind == "country":
            code = country_code(value)
            if code < 0:
                raise ValueError(f"{where}, {at}: expected an ISO 3166 alpha-2 country code such as \"US\"")
            out.append(code + 1)  # as identifier_keys stores it: 0 is "unknown"
        else:
            code = mcc_code(value)
            if code < 0:
                raise ValueError(f"{where}, {at}: expected a 4-digit merchant category code such as \"5411\"")
            out.append(code)
    if kind in CODE_KINDS:
        return np.array(out, dtype=np.float64)
    return np.unique(np.array(out, dtype=np.uint64))


def list_kinds(lists: Mapping[str, NamedList]) -> dict[str, str]:
    """Each list's kind by name: what the rules checker needs."""
    return {name: named.kind for name, named in lists.items()}


def identifier_keys(batch: EncodedBatch) -> np.ndarray:
    """The (IDENTIFIERS, n) uint64 matrix the rules take: the keyed hashes, and country code + 1 (0 unknown)."""
    country = np.where(batch.country >= 0, batch.country + 1, 0).astype(np.uint64)
    return np.stack([batch.card_key, batch.customer_key, batch.merchant_key, batch.device_key, batch.ip_key,
                     country]).astype(np.uint64, copy=False)
