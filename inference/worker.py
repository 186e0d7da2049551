"""One thread that owns the model, and a bounded number of requests allowed to wait for it.

The Translator (torch modules, onnxruntime sessions, a Rust tokenizer) is used from this one thread only, so
concurrent HTTP requests never touch it at the same time. Admission is counted, not queued blindly: when
`max_queue` requests already wait behind the one being translated, `submit` refuses at once (QueueFullError)
instead of letting callers pile up.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Sequence

from inference.translator import Translator

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """Every queue slot is taken; the client should retry later."""


class TranslationWorker:
    """Translates one request at a time (its texts batched) on a single thread; at most max_queue wait."""

    def __init__(self, translator: Translator, max_queue: int, num_beams: int = 1, batch_size: int = 32):
        self.translator, self.max_queue = translator, max_queue
        self.num_beams, self.batch_size = num_beams, batch_size
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="translator")
        self._lock = threading.Lock()
        self._pending = 0  # admitted and not finished: the one translating plus those waiting

    @property
    def pending(self) -> int:
        with self._lock:
            return self._pending

    def submit(self, texts: Sequence[str], direction: str) -> Future:
        """A future for translator.translate(texts, direction); QueueFullError when no slot is free."""
        with self._lock:
            if self._pending > self.max_queue:
                raise QueueFullError(f"server busy: one request in progress and {self._pending - 1} waiting, the "
                                     f"most allowed (--max_queue {self.max_queue}); retry later")
            self._pending += 1
        future = self._executor.submit(self.translator.translate, list(texts), direction, self.num_beams,
                                       self.batch_size)
        future.add_done_callback(self._release)
        return future

    def _release(self, _: Future) -> None:
        with self._lock:
            self._pending -= 1

    def close(self) -> None:
        """Finish what was admitted, then stop the thread."""
        self._executor.shutdown(wait=True)
