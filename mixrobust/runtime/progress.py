"""Progress of a job's long stages: a live bar on a terminal, steady log lines everywhere else.

A stage (training, an attack, the MIX attacks of an alpha sweep, certification's sampling) is opened
with `stage(name, total, unit)` and advanced as its work finishes. Where progress shows is set once
per job by `configure` from the ``progress`` config node:

- ``log``: an INFO log line (Python logging, so Hydra puts it in the console and the job's ``.log``
  file) when a stage starts, every `interval` seconds while it runs, also when a single step of it
  takes longer (a timer thread writes it), and when it ends::

      MIX attacks: 1,440/3,960 images (36%), 52.1 images/s, 27s elapsed, ETA 48s (alpha 0.5, one/prob)

- ``bar``: a live rich progress bar per open stage, plus the start and end lines in the log;
- ``none``: only the start and end lines;
- ``auto`` (default): ``bar`` when both stdout and stderr are terminals, else ``log`` (output to a
  file, a pipe, ``nohup``, ``tee``, a scheduler's log or CI, where a bar would only draw its last frame).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

log = logging.getLogger("mixrobust.progress")

ProgressMode = Literal["auto", "bar", "log", "none"]

#: Seconds between two progress lines of a stage in ``log`` mode unless configured.
DEFAULT_INTERVAL = 30.0


def duration(seconds: float) -> str:
    """A short human duration: ``45s``, ``3m05s``, ``1h02m``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def resolve_mode(mode: str, stdout: Any = None, stderr: Any = None) -> str:
    """``auto`` is ``bar`` when both streams are terminals (and TERM is not ``dumb``), else ``log``."""
    if mode != "auto":
        return mode
    streams = (stdout or sys.stdout, stderr or sys.stderr)
    terminal = all(getattr(s, "isatty", lambda: False)() for s in streams)
    return "bar" if terminal and os.environ.get("TERM") != "dumb" else "log"


class Stage:
    """One stage's counters and its text; `advance` it as work finishes (the timer thread only reads them).

    `done` may start above 0 (a resumed training run): the rate and the ETA count only what this process
    did. `detail` is a string or a function giving one, called only when a line or the bar is drawn (so a
    detail that reads GPU tensors costs nothing per step)."""

    def __init__(self, name: str, total: int, unit: str, clock=time.monotonic, done: int = 0):
        self.name, self.total, self.unit, self.clock = name, max(0, int(total)), unit, clock
        self.done = self.initial = int(done)
        self.detail: str | Callable[[], str] = ""
        self.start = self.last_line = clock()
        self.bar_task: Any = None

    def detail_text(self) -> str:
        if not callable(self.detail):
            return self.detail
        try:
            return self.detail()
        except Exception:  # noqa: BLE001 - read from the timer thread while the work changes it: skip it this time
            return ""

    def line(self) -> str:
        """``name: done/total unit (pct), rate unit/s, elapsed, ETA (detail)`` (``done unit`` without a total)."""
        elapsed = self.clock() - self.start
        text = f"{self.name}: {self.done:,}" + (f"/{self.total:,} {self.unit} ({100 * self.done / self.total:.0f}%)"
                                                 if self.total else f" {self.unit}")
        rate = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
        text += f", {rate:.3g} {self.unit}/s, {duration(elapsed)} elapsed"
        if 0 < self.done < self.total and rate > 0:
            text += f", ETA {duration((self.total - self.done) / rate)}"
        detail = self.detail_text()
        return text + (f" ({detail})" if detail else "")

    def advance(self, n: int = 1) -> None:
        self.done += int(n)
        _REPORTER.advanced(self)


class Reporter:
    """The process's open stages, their bar or timer, and the configured mode."""

    def __init__(self) -> None:
        self.mode: str = "auto"
        self.resolved = resolve_mode(self.mode)
        self.interval = DEFAULT_INTERVAL
        self.stages: list[Stage] = []
        self.lock = threading.RLock()
        self.wake = threading.Event()
        self.timer: threading.Thread | None = None
        self.bar: Any = None
        self.rerouted: list[tuple[logging.StreamHandler, Any]] = []

    def configure(self, mode: str = "auto", interval: float = DEFAULT_INTERVAL) -> None:
        if not interval > 0:
            raise ValueError(f"the progress interval must be > 0 seconds, got {interval!r}")
        self.mode, self.resolved, self.interval = mode, resolve_mode(mode), float(interval)
        self.wake.set()

    # --- stages ---------------------------------------------------------------------------------
    def open(self, stage: Stage) -> None:
        log.info("%s: started, %s %s", stage.name, f"{stage.total:,}" if stage.total else "?", stage.unit)
        with self.lock:
            self.stages.append(stage)
        if self.resolved == "bar":
            self._bar_add(stage)
        elif self.resolved == "log":
            self._start_timer()

    def close(self, stage: Stage, failed: bool) -> None:
        with self.lock:
            if stage in self.stages:
                self.stages.remove(stage)
        if stage.bar_task is not None:
            self._bar_remove(stage)
        if not failed:
            elapsed = stage.clock() - stage.start
            log.info("%s: done, %s %s in %s", stage.name, f"{stage.done:,}", stage.unit, duration(elapsed))

    def advanced(self, stage: Stage) -> None:
        if stage.bar_task is not None:
            self.bar.update(stage.bar_task, completed=stage.done,
                            description=f"{stage.name} {stage.detail_text()}".strip())
        elif self.resolved == "log" and stage.clock() - stage.last_line >= self.interval:
            self._emit(stage)

    def _emit(self, stage: Stage) -> None:
        stage.last_line = stage.clock()
        log.info(stage.line())

    # --- log mode: a line per stage at least every interval, even within a long step -------------
    def _start_timer(self) -> None:
        with self.lock:
            if self.timer is not None and self.timer.is_alive():
                return
            self.timer = threading.Thread(target=self._tick, name="mixrobust-progress", daemon=True)
            self.timer.start()

    def _tick(self) -> None:
        """Sleep until the earliest stage is due (`interval` after its last line), write the due lines."""
        while True:
            with self.lock:
                waits = [s.last_line + self.interval - s.clock() for s in self.stages if s.bar_task is None]
            self.wake.wait(timeout=min([self.interval, *waits]) if waits else self.interval)
            self.wake.clear()
            if self.resolved != "log":
                continue
            with self.lock:
                due = [s for s in self.stages if s.bar_task is None and s.clock() - s.last_line >= self.interval]
            for stage in due:
                self._emit(stage)

    # --- bar mode ----------------------------------------------------------------------------------
    def _bar_add(self, stage: Stage) -> None:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        with self.lock:
            if self.bar is None:
                streams = sys.stdout, sys.stderr
                self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("{task.fields[unit]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                    TimeRemainingColumn())
                self.bar.start()
                self._reroute_console_logs(streams)
            stage.bar_task = self.bar.add_task(stage.name, total=stage.total or None, completed=stage.done,
                                               unit=stage.unit)

    def _reroute_console_logs(self, streams: tuple[Any, Any]) -> None:
        """Console log handlers (Hydra's) write through the bar's redirected stdout / stderr while it is live,
        so log lines print above the bar instead of breaking it."""
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                for original, proxy in zip(streams, (sys.stdout, sys.stderr)):
                    if handler.stream is original and proxy is not original:
                        self.rerouted.append((handler, handler.setStream(proxy)))

    def _bar_remove(self, stage: Stage) -> None:
        with self.lock:
            self.bar.remove_task(stage.bar_task)
            stage.bar_task = None
            if not any(s.bar_task is not None for s in self.stages):
                for handler, original in reversed(self.rerouted):
                    handler.setStream(original)
                self.rerouted.clear()
                self.bar.stop()
                self.bar = None


_REPORTER = Reporter()


def configure(mode: ProgressMode | str = "auto", interval: float = DEFAULT_INTERVAL) -> None:
    """Set this process's progress mode and log interval (module docstring)."""
    _REPORTER.configure(mode, interval)


def current_mode() -> str:
    """The configured mode with ``auto`` resolved for this process's streams: ``bar``, ``log`` or ``none``."""
    return _REPORTER.resolved


def current_interval() -> float:
    """Seconds between two log lines of a stage."""
    return _REPORTER.interval


@contextlib.contextmanager
def stage(name: str, total: int, unit: str = "images", done: int = 0) -> Iterator[Stage]:
    """Open a progress stage of `total` `unit` (`done` of them done already); ``advance`` the yielded `Stage`
    as work finishes."""
    current = Stage(name, total, unit, done=done)
    _REPORTER.open(current)
    failed = True
    try:
        yield current
        failed = False
    finally:
        _REPORTER.close(current, failed)
