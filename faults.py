"""Fault injection for tests/test_faults.py: a run signals itself, or poisons its loss, at an exact step."""

from __future__ import annotations

import os
import signal

FAULT_ENV = "RK_DISTILL_FAULT"


def fault(point: str, step: int) -> bool:
    """Fault injection for tests/test_faults.py. $RK_DISTILL_FAULT holds comma-separated `ACTION:POINT@STEP`
    items, e.g. `SIGKILL:in_save@6` (the process signals itself there: SIGKILL runs no handler, as when a node
    dies) or `nan:loss@3` (returns True: the caller poisons its loss). Points: in_step, in_save, loss."""
    for item in os.environ.get(FAULT_ENV, "").split(","):
        action, _, where = item.rpartition(":")
        if where == f"{point}@{step}":
            if action.startswith("SIG"):
                os.kill(os.getpid(), signal.Signals[action])
            return True
    return False
