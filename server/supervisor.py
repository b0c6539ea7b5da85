"""Keep the local workers running: `python -m server.supervisor --config config.json [--gpus 0,1]`.

start_all.sh runs this (no torch here). It starts one worker per listed GPU (each sees only its
GPU), or `--cpu-workers` CPU workers when no GPU is given, on `worker_base_port + index`, and then
watches them (settings in `service.supervisor`):

  * a worker that exits is started again after a backoff (`backoff_initial_s`, doubling per failure
    up to `backoff_max_s`, back to the start once the worker is ready again);
  * a worker whose `/health` has not answered for `hang_timeout_s` (after its first answer) is hung:
    it is killed (SIGKILL) and started again; one that never answers within `start_timeout_s` too;
  * a worker that fails `max_start_failures` starts in a row without ever getting ready is a start-up
    problem, not a fault to ride out: the supervisor stops everything and exits 1.

A worker that reports `error` (its start failed inside the process) is left running so that its
reason stays visible in `/health`. The gateway notices restarts on its own: the worker is offline
while down, `loading` while it starts, and takes sessions again once it reports idle.

Files in `service.run_dir`: `worker_<i>.pid` (the current process of each worker) and
`worker_<i>.log` (its output, every start appended). SIGTERM/SIGINT stop the workers and exit 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import ServiceConfig, SupervisorConfig, load_config_or_report

log = logging.getLogger("supervisor")

HEALTH_TIMEOUT_S = 2.0
STOP_GRACE_S = 10.0


@dataclass
class WorkerSpec:
    """How to start one worker."""

    index: int
    port: int
    visible_device: str  # CUDA_VISIBLE_DEVICES for the process; "" = CPU
    args: list[str]

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/health"


@dataclass
class WorkerProcess:
    """A supervised worker: its current process and its restart bookkeeping."""

    spec: WorkerSpec
    run_dir: Path
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    last_answer: float | None = None  # monotonic time of the last /health answer of this process
    ready_once: bool = False  # this process reported ready at least once
    start_failures: int = 0  # starts in a row that never got ready
    backoff_s: float = 0.0
    restart_at: float | None = None  # when a stopped worker is due to start again
    starts: int = 0

    @property
    def pid_file(self) -> Path:
        return self.run_dir / f"worker_{self.spec.index}.pid"

    @property
    def log_file(self) -> Path:
        return self.run_dir / f"worker_{self.spec.index}.log"


def plan_workers(cfg: ServiceConfig, config_path: str | None, gpus: list[str], cpu_workers: int,
                 worker_settings: list[str]) -> list[WorkerSpec]:
    """One spec per GPU (the process sees only that GPU, as cuda:0), or `cpu_workers` CPU specs."""
    common = (["--config", config_path] if config_path else [])
    for setting in worker_settings:
        common += ["--set", setting]
    devices = gpus or [""] * cpu_workers
    specs = []
    for index, device in enumerate(devices):
        port = cfg.service.worker_base_port + index
        args = [*common, "--worker-index", str(index), "--port", str(port)]
        if device:
            args += ["--gpu-id", str(index)]
            if cfg.model.device == "auto":
                args += ["--set", "model.device=cuda:0"]
        specs.append(WorkerSpec(index, port, device, args))
    return specs


def fetch_health(url: str) -> dict[str, Any] | None:
    """The worker's health report, or None when it does not answer in time."""
    try:
        with urllib.request.urlopen(url, timeout=HEALTH_TIMEOUT_S) as response:
            report = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


class Supervisor:
    """Starts the workers and keeps them running until `stop()`."""

    def __init__(self, specs: list[WorkerSpec], settings: SupervisorConfig, run_dir: Path,
                 poll_s: float) -> None:
        self.settings = settings
        self.poll_s = poll_s
        self.workers = [WorkerProcess(spec, run_dir, backoff_s=settings.backoff_initial_s) for spec in specs]
        self._stopping = threading.Event()
        self._health_pool = ThreadPoolExecutor(max_workers=max(1, len(specs)), thread_name_prefix="health")

    def run(self) -> int:
        """Supervise until stopped (0) or until a worker cannot start (1)."""
        for worker in self.workers:
            self._start(worker)
        exit_code = 0
        while not self._stopping.wait(self.poll_s):
            if not self._check_all():
                exit_code = 1
                break
        self._stop_all()
        self._health_pool.shutdown(wait=False, cancel_futures=True)
        return exit_code

    def stop(self) -> None:
        self._stopping.set()

    # ---- one round -----------------------------------------------------------------------------

    def _check_all(self) -> bool:
        """Check every worker once; False when one has failed too many starts in a row."""
        running = [w for w in self.workers if w.process is not None]
        reports = dict(zip(
            (w.spec.index for w in running),
            self._health_pool.map(lambda w: fetch_health(w.spec.health_url), running),
        ))
        for worker in self.workers:
            if worker.process is None:
                if worker.restart_at is not None and time.monotonic() >= worker.restart_at:
                    self._start(worker)
                continue
            if not self._check_one(worker, reports.get(worker.spec.index)):
                return False
        return True

    def _check_one(self, worker: WorkerProcess, report: dict[str, Any] | None) -> bool:
        now = time.monotonic()
        spec = worker.spec
        assert worker.process is not None
        returncode = worker.process.poll()
        if returncode is not None:
            log.warning("worker %d (pid %d) exited with status %s", spec.index, worker.process.pid, returncode)
            return self._schedule_restart(worker)
        if report is not None:
            worker.last_answer = now
            if not worker.ready_once and report.get("status") == "healthy" and report.get("model_loaded"):
                worker.ready_once = True
                worker.start_failures = 0
                worker.backoff_s = self.settings.backoff_initial_s
                log.info("worker %d (pid %d) is ready", spec.index, worker.process.pid)
            return True
        if worker.last_answer is None:
            if now - worker.started_at < self.settings.start_timeout_s:
                return True
            log.warning("worker %d (pid %d) did not answer /health within %.0f s of its start; killing it",
                        spec.index, worker.process.pid, self.settings.start_timeout_s)
        elif now - worker.last_answer >= self.settings.hang_timeout_s:
            log.warning("worker %d (pid %d) is hung: no /health answer for %.1f s; killing it",
                        spec.index, worker.process.pid, now - worker.last_answer)
        else:
            return True
        worker.process.kill()
        worker.process.wait()
        return self._schedule_restart(worker)

    def _schedule_restart(self, worker: WorkerProcess) -> bool:
        """The worker's process is gone: plan its next start (False: give up on start failures)."""
        worker.process = None
        worker.pid_file.unlink(missing_ok=True)
        if not worker.ready_once:
            worker.start_failures += 1
            if worker.start_failures >= self.settings.max_start_failures:
                log.error("worker %d failed %d starts in a row without getting ready; giving up (log: %s)",
                          worker.spec.index, worker.start_failures, worker.log_file)
                return False
        delay = worker.backoff_s
        worker.backoff_s = min(max(delay * 2, self.settings.backoff_initial_s), self.settings.backoff_max_s)
        worker.restart_at = time.monotonic() + delay
        log.info("worker %d restarts in %.1f s", worker.spec.index, delay)
        return True

    # ---- processes -----------------------------------------------------------------------------

    def _start(self, worker: WorkerProcess) -> None:
        spec = worker.spec
        worker.starts += 1
        with worker.log_file.open("a") as log_file:
            log_file.write(f"=== supervisor: start #{worker.starts} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            log_file.flush()
            worker.process = subprocess.Popen(
                [sys.executable, "-m", "workers.worker", *spec.args],
                env={**os.environ, "CUDA_VISIBLE_DEVICES": spec.visible_device},
                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        worker.pid_file.write_text(f"{worker.process.pid}\n")
        worker.started_at = time.monotonic()
        worker.last_answer = None
        worker.ready_once = False
        worker.restart_at = None
        where = f"GPU {spec.visible_device}" if spec.visible_device else "CPU"
        log.info("worker %d started: pid %d, port %d, %s (start #%d)",
                 spec.index, worker.process.pid, spec.port, where, worker.starts)

    def _stop_all(self) -> None:
        """SIGTERM every worker, SIGKILL what is left after STOP_GRACE_S, remove the pid files."""
        running = [w for w in self.workers if w.process is not None]
        for worker in running:
            worker.process.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for worker in running:
            try:
                worker.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
        for worker in self.workers:
            worker.pid_file.unlink(missing_ok=True)
        log.info("stopped %d worker(s)", len(running))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.supervisor", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="config file (default: config.json of the repository)")
    parser.add_argument("--gpus", default="", help="comma-separated CUDA device ids, one worker each")
    parser.add_argument("--cpu-workers", type=int, default=1, help="CPU workers when --gpus is empty")
    parser.add_argument("--worker-set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override passed to every worker (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config_or_report(args.config, args.worker_set, "supervisor")
    if cfg is None:
        return 2
    config_path = str(Path(args.config).resolve()) if args.config else None
    gpus = [gpu.strip() for gpu in args.gpus.split(",") if gpu.strip()]
    specs = plan_workers(cfg, config_path, gpus, args.cpu_workers, args.worker_set)
    run_dir = Path(cfg.service.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    supervisor = Supervisor(specs, cfg.service.supervisor, run_dir, cfg.service.health_poll_s)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: supervisor.stop())
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
