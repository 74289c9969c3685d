"""What every CPU micro-benchmark of the serving path records beside its figures, and how it writes them."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def record(script: str, threads: int, **figures) -> dict:
    """The command (this process's own arguments), the CPU, the date, the commit (`-dirty` with local changes)."""
    return {
        "command": f"PYTHONPATH=src python bench/serving/{script} " + " ".join(sys.argv[1:]),
        "device": (f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), "
                   f"{threads} torch threads"),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                 cwd=ROOT).stdout.strip(),
        **figures,
    }


def save(path: Path | None, doc: dict) -> None:
    if path is None:
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)
    print(f"wrote {path}")
