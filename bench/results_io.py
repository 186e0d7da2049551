"""Where every benchmark's JSON goes, with the facts needed to compare runs (date, command, machine)."""

from __future__ import annotations

import json
import sys
from datetime import date
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def write_results(name: str, out: Path | None, payload: dict) -> Path:
    """Write payload plus date and command to `out`, or bench/results/<name>.json; print and return the path."""
    out = out or RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"bench": name.split("-")[0], "date": date.today().isoformat(), "command": " ".join(sys.argv),
              **payload}
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return out
