"""Progress of a long stage: a bar on a terminal, periodic log lines otherwise, nothing when quiet.

* **quiet** — the ``segpipe`` logger's level is above INFO (``-q``): nothing is shown;
* **bar** — stderr is a terminal: one line redrawn in place (at most ~10 times a second, or once
  per ``refresh`` seconds), ``fingerprint  [#######.......]  12/24 cases  0:05 < 0:05``, ended with
  a newline; with ``delay``, drawn only once the stage has run that long (a short one stays silent);
* **log lines** — stderr is a file or a pipe (CI, ``2> log``): an INFO line on the ``segpipe``
  logger each time another ~10 % is done (at most one per ``min_interval`` seconds) or
  ``max_interval`` seconds passed, and a last line when any was written (a stage that ends
  before its first line was due stays silent).

No dependency: the bar is a dozen lines, and a stage's progress is one number.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import IO, Any

__all__ = ["Progress", "progress_mode"]

log = logging.getLogger("segpipe")

BAR_WIDTH = 24
BAR_REFRESH = 0.1  # seconds between redraws of the bar
LOG_STEP = 0.1  # a log line per 10 % done ...
LOG_MIN_INTERVAL = 5.0  # ... but at most one per 5 s
LOG_MAX_INTERVAL = 30.0  # and one at least every 30 s


def progress_mode(stream: IO[str] | None = None) -> str:
    """``"quiet"``, ``"bar"`` or ``"log"`` for ``stream`` (default stderr) and the ``segpipe`` logger's level."""
    if log.getEffectiveLevel() > logging.INFO:
        return "quiet"
    stream = sys.stderr if stream is None else stream
    try:
        tty = bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        tty = False
    return "bar" if tty else "log"


def _clock(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Progress of ``total`` units of work named ``desc``; call :meth:`update` per unit, :meth:`close` at the end.

    Usable as a context manager. ``mode`` overrides the automatic choice (``"bar"``, ``"log"``,
    ``"quiet"``); ``enabled=False`` is quiet. ``min_interval``/``max_interval`` bound the log lines'
    spacing (default :data:`LOG_MIN_INTERVAL`/:data:`LOG_MAX_INTERVAL`), ``refresh`` the bar's
    (:data:`BAR_REFRESH`); ``delay`` seconds pass before the bar is first drawn.
    """

    def __init__(
        self,
        desc: str,
        total: int,
        *,
        unit: str = "case",
        enabled: bool = True,
        mode: str | None = None,
        stream: IO[str] | None = None,
        min_interval: float | None = None,
        max_interval: float | None = None,
        refresh: float | None = None,
        delay: float = 0.0,
    ):
        self.desc = desc
        self.total = max(0, int(total))
        self.unit = unit
        self.n = 0
        self.stream = sys.stderr if stream is None else stream
        self.mode = "quiet" if not enabled else (mode or progress_mode(self.stream))
        self.min_interval = LOG_MIN_INTERVAL if min_interval is None else float(min_interval)
        self.max_interval = LOG_MAX_INTERVAL if max_interval is None else float(max_interval)
        self.refresh = BAR_REFRESH if refresh is None else float(refresh)
        self.delay = float(delay)
        self._t0 = time.monotonic()
        self._last_draw = 0.0
        self._last_log = self._t0
        self._logged_step = 0
        self._logged = False
        self._drawn = False
        self._closed = False
        self._width = 0
        if self.mode == "bar" and self.total and self.delay <= 0:
            self._draw()

    # -------------------------------------------------------------- public
    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.mode == "bar":
            due = now - self._last_draw >= self.refresh or (self._drawn and self.n >= self.total)
            if due and now - self._t0 >= self.delay:
                self._draw(now)
        elif self.mode == "log":
            self._maybe_log(now)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.mode == "bar" and self.total and self._drawn:
            self._draw()
            self._write("\n")
        elif self.mode == "log" and self._logged:
            log.info("%s: %s in %s", self.desc, self._count(), _clock(time.monotonic() - self._t0))

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -------------------------------------------------------------- internals
    def _count(self) -> str:
        unit = self.unit if self.total == 1 else f"{self.unit}s"
        return f"{self.n}/{self.total} {unit}"

    def _eta(self, now: float) -> str:
        elapsed = now - self._t0
        if not self.n or self.n >= self.total:
            return _clock(elapsed)
        return f"{_clock(elapsed)} < {_clock(elapsed / self.n * (self.total - self.n))}"

    def _maybe_log(self, now: float) -> None:
        if not self.total or self.n >= self.total:  # the end is close()'s line
            return
        step = int(self.n / self.total / LOG_STEP)
        since = now - self._last_log
        if (step > self._logged_step and since >= self.min_interval) or since >= self.max_interval:
            self._logged_step, self._last_log, self._logged = step, now, True
            log.info("%s: %s (%d%%), %s", self.desc, self._count(), 100 * self.n // self.total, self._eta(now))

    def _draw(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._last_draw, self._drawn = now, True
        frac = min(1.0, self.n / self.total) if self.total else 1.0
        filled = int(round(frac * BAR_WIDTH))
        line = f"{self.desc}  [{'#' * filled}{'.' * (BAR_WIDTH - filled)}]  {self._count()}  {self._eta(now)}"
        pad = " " * max(0, self._width - len(line))
        self._width = len(line)
        self._write(f"\r{line}{pad}")

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stderr must not fail the stage
            self.mode = "quiet"
