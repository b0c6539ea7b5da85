"""Wait until workers are ready, printing each one's start phase and progress as it changes.

`python -m server.wait_workers [--timeout S] URL[=PID] ...` exits 0 once every worker's /health
says ready (`status: healthy`, `model_loaded: true`, `worker_status: idle`), 1 as soon as one
reports `error` or its process (PID, when given) has exited, 2 on timeout. Used by start_all.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any

POLL_S = 1.0
REPEAT_S = 10.0  # an unchanged phase/step is printed again after this long, so a long phase shows life


def fetch_health(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2.0) as response:
            report = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


def is_ready(report: dict[str, Any]) -> bool:
    return (
        report.get("status") == "healthy"
        and report.get("model_loaded") is True
        and report.get("worker_status") == "idle"
    )


def progress_line(index: int, report: dict[str, Any] | None) -> str:
    if report is None:
        return f"worker {index}: starting (no /health answer yet)"
    progress = report.get("progress") or {}
    phase = progress.get("phase") or report.get("worker_status")
    parts = [f"worker {index}: {phase}"]
    if progress.get("total"):
        parts.append(f"{progress.get('step', 0)}/{progress['total']} ({100 * progress.get('fraction', 0):.0f}%)")
    if progress.get("elapsed_s") is not None:
        parts.append(f"{progress['elapsed_s']:.0f}s")
    if progress.get("eta_s"):
        parts.append(f"eta {progress['eta_s']:.0f}s")
    if progress.get("message"):
        parts.append(f"- {progress['message']}")
    return " ".join(parts)


def progress_key(report: dict[str, Any] | None) -> str:
    """What must change for a new line: phase, step and message (not the elapsed time)."""
    if report is None:
        return "down"
    progress = report.get("progress") or {}
    return f"{progress.get('phase')}|{progress.get('step')}|{progress.get('total')}|{progress.get('message')}"


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait(targets: list[tuple[str, int | None]], timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    last_printed: dict[int, tuple[str, float]] = {}
    while True:
        ready = 0
        for index, (url, pid) in enumerate(targets):
            report = fetch_health(url)
            key = progress_key(report)
            previous_key, printed_at = last_printed.get(index, ("", 0.0))
            if key != previous_key or time.monotonic() - printed_at >= REPEAT_S:
                print(progress_line(index, report), flush=True)
                last_printed[index] = (key, time.monotonic())
            if report is not None and (report.get("status") == "error" or report.get("worker_status") == "error"):
                print(f"worker {index} failed: {report.get('error') or report.get('progress', {}).get('message')}",
                      file=sys.stderr)
                return 1
            if pid is not None and not process_alive(pid):
                print(f"worker {index} (pid {pid}) exited during start", file=sys.stderr)
                return 1
            ready += bool(report and is_ready(report))
        if ready == len(targets):
            return 0
        if time.monotonic() > deadline:
            print(f"workers not ready after {timeout_s:.0f}s", file=sys.stderr)
            return 2
        time.sleep(POLL_S)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.wait_workers", description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("workers", nargs="+", metavar="URL[=PID]")
    args = parser.parse_args(argv)
    targets = []
    for item in args.workers:
        url, _, pid = item.partition("=")
        targets.append((url.rstrip("/"), int(pid) if pid else None))
    return wait(targets, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
