"""How long the pipeline thread will take: learnt from the calls it made, never extrapolated.

The batcher asks before queueing a call (will it be answered within its budget?) and its
budget watch asks while a call waits. Three kinds of work take the pipeline thread:

- a batch that scores `n` transactions: `expected_s(n)`, by power-of-two size bucket;
- transactions already answered by the fallback that only enter the state (features, no
  model): `state_only_s` each, added to the batch they ride in;
- `Work` run in its turn (an outcome report, a snapshot's state copy): `expected_work_s(kind)`.
"""

from __future__ import annotations

_BUCKETS = 18  # sizes up to 2**17, beyond MAX_BATCH's 65,536
STALL_FACTOR = 4.0  # one call counts as at most this many times what was expected (+ 1 ms)


def _bucket(n: int) -> int:
    """0 for n ≤ 1, then k for 2**(k-1) < n ≤ 2**k."""
    return min(max(n - 1, 0).bit_length(), _BUCKETS - 1)


def bucket_sizes(max_batch: int) -> list[int]:
    """The largest size of each bucket up to `max_batch` (1, 2, 4, …, max_batch): the sizes a warm-up
    times so that every bucket a batch can fall in is measured."""
    sizes = [1 << k for k in range(_bucket(max_batch)) if 1 << k < max_batch]
    return [*sizes, max_batch]


class PipelineTimer:
    """Expected wall time of pipeline calls, from the calls measured at similar sizes.

    Sizes fall in power-of-two buckets (1, 2, 3–4, 5–8, …); each bucket keeps an exponentially
    weighted mean of its calls' wall times (the last ~`memory` calls of that bucket count most).
    A prediction is never extrapolated: it is the mean of the size's own bucket, or, for a
    bucket not yet measured, of the nearest measured bucket above it (a larger call bounds a
    smaller one), else below it. So no prediction exceeds the slowest call measured. (A line
    `fixed + per_item · n` fitted on calls of one or two transactions, as before, once
    predicted a batch of 50 at 235 ms from calls that never took 5 ms: every one of them
    answered degraded by an idle server.) Start-up seeds every bucket, the features-only cost
    and the snapshot copy from timed calls on a throwaway state (service/runtime/app.py).

    One stalled call must not make every later one look hopeless (calls predicted late skip
    the pipeline, so no fast call would ever correct it): a call counts as at most
    `STALL_FACTOR` times what was expected; a lasting slowdown is learnt in a few calls.
    """

    __slots__ = ("_decay", "_mean_s", "_measured", "_state_only_s", "_work_s")

    def __init__(self, *, memory: int = 16) -> None:
        self._decay = 1.0 - 1.0 / memory
        self._mean_s = [0.0] * _BUCKETS
        self._measured = [False] * _BUCKETS
        self._state_only_s: float | None = None
        self._work_s: dict[str, float] = {}

    @property
    def measured(self) -> bool:
        return any(self._measured)

    def _mean(self, old: float | None, seconds: float) -> float:
        if old is None:
            return seconds
        seconds = min(seconds, STALL_FACTOR * old + 0.001)
        # Never above both terms (rounding could put a mean of two equal calls a hair above them).
        return min(old * self._decay + seconds * (1.0 - self._decay), max(old, seconds))

    def observe(self, n: int, seconds: float) -> None:
        """A call that scored `n` transactions took `seconds`."""
        b = _bucket(n)
        self._mean_s[b] = self._mean(self._mean_s[b] if self._measured[b] else None, seconds)
        self._measured[b] = True

    def observe_batch(self, scored: int, state_only: int, seconds: float) -> None:
        """A call that scored `scored` transactions and fed `state_only` more into the state took
        `seconds`: the state-only part at its learnt cost, the rest to the scored size's bucket."""
        if not state_only:
            self.observe(scored, seconds)
        elif not scored:
            self._state_only_s = self._mean(self._state_only_s, seconds / state_only)
        else:
            self.observe(scored, max(seconds - state_only * (self._state_only_s or 0.0), 0.0))

    def observe_work(self, kind: str, seconds: float) -> None:
        """A `Work` of `kind` (an outcome report, a snapshot copy) took `seconds`."""
        self._work_s[kind] = self._mean(self._work_s.get(kind), seconds)

    def expected_s(self, n: int) -> float:
        """A call scoring `n` transactions."""
        b = _bucket(n)
        measured, mean = self._measured, self._mean_s
        if measured[b]:
            return mean[b]
        for above in range(b + 1, _BUCKETS):
            if measured[above]:
                return mean[above]
        for below in range(b - 1, -1, -1):
            if measured[below]:
                return mean[below]
        return 0.0

    @property
    def state_only_s(self) -> float:
        """One transaction fed into the state without scoring (0 until measured)."""
        return self._state_only_s or 0.0

    def expected_batch_s(self, scored: int, state_only: int) -> float:
        """A call scoring `scored` transactions and feeding `state_only` more into the state."""
        return (self.expected_s(scored) if scored else 0.0) + state_only * self.state_only_s

    def expected_work_s(self, kind: str) -> float:
        """A `Work` of `kind` (0 until one was measured)."""
        return self._work_s.get(kind, 0.0)
