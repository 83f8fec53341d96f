"""Progress for a person waiting: a live bar on a terminal, one line per step in a log.

Each step ends with exactly one line on stderr, ``<label>: <detail> (<seconds> s)``, printed the
same way on a terminal (where a rich spinner or bar shows the step while it runs, then gives way
to that line) and in a log or pipe (where nothing else is written, so lines never interleave).
``quiet`` prints nothing. Imports no TensorFlow; rich only when a terminal shows the bar.

Bad input is one ``error:`` line on stderr. So, in a log, a stage may ``hold`` its lines until
its inputs are checked (``release``): an error before that is the only line. A terminal shows
every line at once (the person reading it sees the steps, then the error).
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager


class Step:
    """One step in progress: ``advance`` counts work done, ``done`` sets the closing detail."""

    def __init__(self, owner: "Progress", label: str, total: int | None):
        self.owner, self.label, self.total = owner, label, total
        self.count = 0
        self.detail = ""
        self._bar = None
        self._task = None
        self._lock = threading.Lock()

    def advance(self, n: int = 1) -> None:
        """``n`` more units done (thread-safe: the folder scan counts from worker threads)."""
        with self._lock:
            self.count += n
            count = self.count
        if self._bar is not None:
            self._bar.advance(self._task, n)
            if not self.total:
                self._bar.update(self._task, description=f"{self.label}: {count}")

    def describe(self, text: str) -> None:
        """Changes what the live bar says (a terminal only; the log line is the label's)."""
        if self._bar is not None:
            self._bar.update(self._task, description=f"{self.label}: {text}")

    def done(self, detail: str) -> None:
        """The text of the step's closing line (after ``label: ``)."""
        self.detail = detail


class Progress:
    """Where the steps of a stage report to.

    Args:
        quiet: print nothing.
        stream: where lines go (default: stderr, so stdout stays the result).
        live: show a live bar; default: when ``stream`` is a terminal.
    """

    def __init__(self, quiet: bool = False, stream=None, live: bool | None = None,
                 hold: bool = False):
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        if live is None:
            isatty = getattr(self.stream, "isatty", None)
            live = bool(isatty and isatty())
        self.live = live and not quiet
        self._held: list[str] | None = [] if hold and not self.live else None

    def line(self, text: str, always: bool = False) -> None:
        """One line (nothing when quiet, unless ``always``); held until ``release`` if held.

        Control characters (escape sequences from a file name, say) are printed escaped; line
        breaks the caller put in ``text`` are kept.
        """
        if self.quiet and not always:
            return
        from edgetl.runner import printable  # numpy only, no TensorFlow

        text = "\n".join(printable(part) for part in str(text).split("\n"))
        if self._held is not None:
            self._held.append(text)
        else:
            print(text, file=self.stream, flush=True)

    def release(self) -> None:
        """The inputs are good: print the held lines, and from now on each line as it comes."""
        held, self._held = self._held, None
        for text in held or ():
            print(text, file=self.stream, flush=True)

    @contextmanager
    def step(self, label: str, total: int | None = None):
        """A step: a live bar (``total`` known) or spinner while the block runs, then one line.

        A step that raises prints nothing: the error says what happened.
        """
        step = Step(self, label, total)
        t0 = time.perf_counter()
        bar = self._start_bar(step) if self.live else None
        try:
            yield step
        finally:
            if bar is not None:
                bar.stop()
        seconds = time.perf_counter() - t0
        self.line(f"{label}: {step.detail or 'done'} ({seconds:.1f} s)")

    def _start_bar(self, step: Step):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress as Bar, SpinnerColumn,
                                   TextColumn, TimeElapsedColumn)

        columns = [SpinnerColumn(), TextColumn("{task.description}")]
        if step.total:
            columns += [BarColumn(), MofNCompleteColumn()]
        bar = Bar(*columns, TimeElapsedColumn(), console=Console(file=self.stream),
                  transient=True, redirect_stdout=False, redirect_stderr=False)
        step._task = bar.add_task(step.label, total=step.total or None)
        step._bar = bar
        bar.start()
        return bar


SILENT = Progress(quiet=True)
