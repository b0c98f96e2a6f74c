"""core.offline.progress: a bar on a terminal, plain lines elsewhere."""

from __future__ import annotations

import io

from core.offline.progress import Lines, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_a_line_every_interval_and_one_at_the_end_never_a_redraw() -> None:
    log = io.StringIO()
    with progress(1000, "replay", "txn", stream=log, every_s=0.0) as bar:
        assert isinstance(bar, Lines)
        for _ in range(4):
            bar.update(250)
    lines = log.getvalue().splitlines()
    assert len(lines) == 5 and "\r" not in log.getvalue()
    assert lines[0].startswith("replay: 250/1,000 txn (25 %)")
    assert lines[-1].startswith("replay: 1,000/1,000 txn (100 %)")


def test_a_slow_interval_prints_only_the_final_line() -> None:
    log = io.StringIO()
    with progress(10, "features", "txn", stream=log, every_s=3600.0) as bar:
        for _ in range(10):
            bar.update(1)
    assert log.getvalue().splitlines() == [line for line in log.getvalue().splitlines() if "10/10 txn (100 %)" in line]
    assert len(log.getvalue().splitlines()) == 1


def test_a_terminal_gets_a_bar_and_disabled_gets_nothing() -> None:
    from tqdm import tqdm

    terminal = Terminal()
    with progress(5, "boosting", "tree", stream=terminal) as bar:
        assert isinstance(bar, tqdm)
        bar.update(5)
    assert "\r" in terminal.getvalue()
    quiet = io.StringIO()
    with progress(5, "boosting", "tree", stream=quiet, enabled=False) as bar:
        bar.update(5)
    assert quiet.getvalue() == ""
