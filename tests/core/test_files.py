from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from core.files import WRITE_CHUNK, PacedFile, Pacer, write_atomically, write_npz


class FakeTime:
    """A clock that moves when told to (work), when slept on (pauses) and by `tick` at each reading."""

    def __init__(self, tick: float = 0.0) -> None:
        self.now = 0.0
        self.tick = tick
        self.slept: list[float] = []

    def clock(self) -> float:
        self.now += self.tick
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


def test_a_pacer_pauses_in_proportion_to_each_slice_of_work() -> None:
    t = FakeTime()
    pacer = Pacer(0.25, clock=t.clock, sleep=t.sleep)
    for work in (0.002, 0.010, 0.0):
        t.now += work
        pacer.pace()
    assert t.slept == pytest.approx([0.006, 0.030])  # 3× each slice at a quarter; no pause for nothing
    assert pacer.slept_s == pytest.approx(0.036)
    assert t.now == pytest.approx(4 * 0.012)  # the work took a quarter of the time


def test_a_full_share_never_sleeps_and_a_share_outside_0_1_is_refused() -> None:
    t = FakeTime()
    pacer = Pacer(1.0, clock=t.clock, sleep=t.sleep)
    t.now += 5.0
    pacer.pace()
    assert t.slept == [] and pacer.slept_s == 0.0
    for share in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=r"share of the time is in \(0, 1\]"):
            Pacer(share)


def test_a_paced_file_writes_in_chunks_and_is_otherwise_the_file() -> None:
    t = FakeTime(tick=0.001)
    raw = io.BytesIO()
    paced = PacedFile(raw, Pacer(0.5, clock=t.clock, sleep=t.sleep))  # type: ignore[arg-type]
    data = bytes(range(256)) * (WRITE_CHUNK // 128 + 3)  # two chunks and a bit
    assert paced.write(data) == len(data)
    assert raw.getvalue() == data and paced.tell() == len(data)
    paced.seek(1)
    paced.write(b"\xff")
    assert raw.getvalue()[:3] == b"\x00\xff\x02"
    assert len(t.slept) == 4  # one pause after each chunk: 3 for the data, 1 for the patch


def test_write_atomically_hands_the_writer_a_paced_file(tmp_path: Path) -> None:
    t = FakeTime(tick=0.001)
    seen: list[type] = []

    def write(f: object) -> None:
        seen.append(type(f))
        f.write(b"x" * (WRITE_CHUNK + 1))  # type: ignore[attr-defined]

    write_atomically(tmp_path / "f", write, pacer=Pacer(0.5, clock=t.clock, sleep=t.sleep))
    assert seen == [PacedFile] and (tmp_path / "f").read_bytes() == b"x" * (WRITE_CHUNK + 1)
    assert len(t.slept) == 2


arrays = st.dictionaries(
    st.from_regex(r"[a-z][a-z_.]{0,12}", fullmatch=True),
    hnp.arrays(dtype=st.one_of(hnp.integer_dtypes(), hnp.unsigned_integer_dtypes(), hnp.floating_dtypes(),
                               hnp.boolean_dtypes(), hnp.unicode_string_dtypes(max_len=6)),
               shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=5)),
    max_size=5)


@settings(max_examples=60, deadline=None)
@given(arrays, st.booleans())
def test_write_npz_holds_what_np_savez_holds(named: dict[str, np.ndarray], fortran: bool) -> None:
    if fortran:
        named = {k: np.asfortranarray(v) for k, v in named.items()}
    ours, numpys = io.BytesIO(), io.BytesIO()
    write_npz(ours, named)  # type: ignore[arg-type]
    np.savez(numpys, **named)
    with zipfile.ZipFile(ours) as a, zipfile.ZipFile(numpys) as b:
        assert a.namelist() == b.namelist()
        for name in a.namelist():
            if not fortran:  # np.savez keeps Fortran order in the header; ours writes C order
                assert a.read(name) == b.read(name)  # byte for byte the same .npy member
    ours.seek(0)
    with np.load(ours, allow_pickle=False) as loaded:
        assert sorted(loaded.files) == sorted(named)
        for k, v in named.items():
            assert loaded[k].dtype == v.dtype and np.array_equal(loaded[k], v, equal_nan=v.dtype.kind == "f")


def test_write_npz_paces_each_chunk_and_refuses_python_objects() -> None:
    t = FakeTime(tick=0.001)
    big = np.zeros(WRITE_CHUNK // 8 * 2 + 1, dtype=np.float64)  # three chunks
    write_npz(io.BytesIO(), {"big": big}, pacer=Pacer(0.5, clock=t.clock, sleep=t.sleep))  # type: ignore[arg-type]
    assert len(t.slept) == 3
    with pytest.raises(ValueError, match="'o' holds Python objects"):
        write_npz(io.BytesIO(), {"o": np.array([object()])})  # type: ignore[arg-type]
