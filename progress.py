"""Progress bars that redraw on a terminal and stay out of log files.

With stderr going to a file (CI, nohup, a cluster scheduler), every redraw of a tqdm bar is written to it: a run's
log becomes mostly bar updates. Entry points call `quiet_unless_terminal()` first; bars of our own are `Progress`:
a tqdm bar on a terminal, and in a file either nothing (the per-step log line says it all) or one log line now and
then, for work that logs nothing else for minutes.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from tqdm import tqdm


def on_terminal() -> bool:
    return sys.stderr.isatty()


def quiet_unless_terminal() -> None:
    """Switch off the progress bars of every library (transformers' weight loading, datasets, the hub) when stderr
    is not a terminal. tqdm takes TQDM_* environment variables as its defaults and the Hugging Face libraries read
    HF_HUB_DISABLE_PROGRESS_BARS when first imported, so both are set for what loads later (and child processes);
    libraries imported already are told directly."""
    if on_terminal():
        return
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging
        transformers_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()


class Progress:
    """A tqdm bar when stderr is a terminal; otherwise a line on `log` every `every` seconds (never when every is
    0), with the count, the rate and the time left. shown=False (other ranks) shows nothing anywhere."""

    def __init__(self, total: int, desc: str, unit: str, log: logging.Logger | None = None, every: float = 0.0,
                 shown: bool = True, initial: int = 0):
        self.total, self.desc, self.unit, self.log, self.every = total, desc, unit, log, every
        self.count = self.initial = initial
        self.started = self.last_line = time.perf_counter()
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True) \
            if shown and on_terminal() else None
        self.lines = shown and self.bar is None and log is not None and every > 0

    def update(self, n: int = 1) -> None:
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.lines and (time.perf_counter() - self.last_line >= self.every or self.count >= self.total):
            self.last_line = time.perf_counter()
            self.log.info("%s: %s", self.desc, self.status())

    def status(self) -> str:
        """'1,200/5,000 src (24%), 35.2 src/s, 1.8 min left'."""
        elapsed = time.perf_counter() - self.started
        rate = (self.count - self.initial) / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.count) / rate / 60 if rate > 0 else float("nan")
        share = self.count / self.total if self.total else 1.0
        return (f"{self.count:,}/{self.total:,} {self.unit} ({share:.0%}), {rate:.1f} {self.unit}/s, "
                f"{left:.1f} min left")

    def set_postfix(self, **values) -> None:
        if self.bar is not None:
            self.bar.set_postfix(**values)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
