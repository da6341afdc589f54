"""One progress-bar factory for every stage: :func:`bar`.

On a terminal it is tqdm's own bar (``tqdm.auto``: redrawn in place). Where its stream is not a
terminal (``make demo > log``, CI, a pipe) a redrawn bar would fill the file with carriage-return
frames, so the bar writes plain, newline-terminated lines instead: one when it starts, then at
most one every :data:`LOG_INTERVAL_S` seconds while it moves, and a last one when it closes.
The object is a tqdm either way (``update``, ``set_postfix``, iteration, ``with``), so callers
never need to know which kind they got.
"""

from __future__ import annotations

import os
import sys

from tqdm import tqdm as _plain_tqdm

LOG_INTERVAL_S = float(os.environ.get("MUTASK_PROGRESS_INTERVAL_S", "30"))


class LogBar(_plain_tqdm):
    """A tqdm that writes whole lines (no ``\\r`` redraws, no bar glyphs): for logs and pipes."""

    def __init__(self, *args, **kwargs):
        interval = kwargs.pop("interval", LOG_INTERVAL_S)
        kwargs["mininterval"] = interval
        kwargs["maxinterval"] = max(interval, kwargs.get("maxinterval", 0.0))  # tqdm's monitor must not print sooner
        kwargs["miniters"] = 1  # check the clock on every update; the interval does the limiting
        kwargs["dynamic_ncols"] = False
        iterable = args[0] if args else kwargs.get("iterable")
        total = kwargs.get("total")
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        known = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
        unknown = "{desc}: {n_fmt} {unit} [{elapsed}, {rate_fmt}{postfix}]"  # no percentage or time left without a total
        kwargs.setdefault("bar_format", unknown if total is None else known)
        self._logged = None
        super().__init__(*args, **kwargs)

    # a log line comes from the clock (update) or the end (close), never from a changed label
    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        super().set_postfix(ordered_dict, refresh=False, **kwargs)

    def set_postfix_str(self, s="", refresh=True):
        super().set_postfix_str(s, refresh=False)

    def set_description(self, desc=None, refresh=True):
        super().set_description(desc, refresh=False)

    def set_description_str(self, desc=None, refresh=True):
        super().set_description_str(desc, refresh=False)

    def display(self, msg=None, pos=None):
        if msg == "":  # tqdm clearing its line on close: nothing to clear in a log
            return False
        line = (self.__str__() if msg is None else msg).rstrip()
        if line == self._logged:
            return True
        self.fp.write(line + "\n")
        self.fp.flush()
        self._logged = line
        return True

    def close(self):
        if getattr(self, "disable", True):
            return
        if self.n != self.last_print_n or self._logged is None:
            self.display()  # the final count, once
        self.leave = False  # tqdm's own close would add a blank line
        super().close()


def is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def bar(total=None, desc=None, unit="it", disable=False, *, iterable=None, file=None, leave=True, **kwargs):
    """A progress bar over ``total`` items (or ``iterable``) written to ``file`` (default
    stderr): tqdm's redrawn bar on a terminal, plain lines every ~30 s elsewhere (see the
    module docstring). Other keyword arguments go to tqdm."""
    stream = sys.stderr if file is None else file
    if is_terminal(stream):
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, file=file, leave=leave, **kwargs)
    return LogBar(iterable, total=total, desc=desc, unit=unit, disable=disable, file=stream, leave=leave, **kwargs)
