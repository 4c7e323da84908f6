"""Helpers the benchmark scripts share (run as scripts, they import this from their own folder)."""

from __future__ import annotations

import subprocess
import sys


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def uptime() -> str:
    """The machine's `uptime` line (load averages), recorded beside every measurement."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "uptime unavailable"
