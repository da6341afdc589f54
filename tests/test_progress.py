"""mutask.progress.bar: tqdm's bar on a terminal, plain lines at most every interval in a log."""

import io

from mutask.progress import LogBar, bar


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_gets_whole_lines_only():
    log = io.StringIO()
    with bar(500, "train", "step", file=log) as b:  # the default interval (~30 s): no line while it runs
        for i in range(500):
            b.update(1)
            b.set_postfix(loss=f"{1 / (i + 1):.3f}")  # a changed label prints nothing on its own
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert len(lines) == 2, lines  # the start and the end, nothing in between
    assert lines[0].startswith("train:   0% 0/500 step") and lines[1].startswith("train: 100% 500/500 step"), lines
    assert "loss=0.002" in lines[1]


def test_a_log_gets_a_line_per_interval_and_iterables_and_unknown_totals_work():
    log = io.StringIO()
    for _ in bar(iterable=range(4), desc="children", unit="child", file=log, interval=0):
        pass
    lines = log.getvalue().splitlines()
    assert [ln.split("|")[0].split(" [")[0] for ln in lines] == [f"children: {p:3d}% {n}/4 child" for n, p in zip(range(5), (0, 25, 50, 75, 100))]
    log = io.StringIO()
    with bar(None, "decode", "img", file=log, interval=0) as b:
        b.update(3)
    assert log.getvalue().splitlines()[-1].startswith("decode: 3 img [") and "\r" not in log.getvalue()


def test_disabled_writes_nothing_and_a_terminal_gets_tqdms_bar():
    log = io.StringIO()
    with bar(5, "x", disable=True, file=log) as b:
        b.update(5)
    assert log.getvalue() == ""
    term = FakeTerminal()
    with bar(5, "x", "it", file=term) as b:
        b.update(5)
    assert not isinstance(b, LogBar) and "\r" in term.getvalue()  # redrawn in place
