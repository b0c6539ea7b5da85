"""`bash start_all.sh` brings the whole service up on this CPU machine (workers under the supervisor);
`stop` ends exactly its processes."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.gateway_helpers import REPO, free_port, http_json

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_start_all_then_stop(tmp_path):
    config = json.loads((REPO / "config.json").read_text())
    run_dir = tmp_path / "run"
    config["service"].update(gateway_port=free_port(), worker_base_port=free_port(), run_dir=str(run_dir),
                             compile=False, warmup=False)
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}

    started = subprocess.run(["bash", "start_all.sh", "--config", str(config_path)], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=240)
    pids = {p.name: int(p.read_text()) for p in run_dir.glob("*.pid")}
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert "no GPU found: one CPU worker with the tiny preset" in started.stdout
        assert "worker 0: loading" in started.stdout  # progress lines while it loads
        assert "service is up" in started.stdout and "/v1/realtime?mode=audio|video" in started.stdout
        assert set(pids) == {"gateway.pid", "supervisor.pid", "worker_0.pid"}
        gateway = f"http://127.0.0.1:{config['service']['gateway_port']}"
        assert http_json(f"{gateway}/health")["status"] == "healthy"
        status = http_json(f"{gateway}/status")
        assert status["total_workers"] == 1 and status["idle_workers"] == 1
        worker = http_json(f"http://127.0.0.1:{config['service']['worker_base_port']}/health")
        assert worker["preset"] == "tiny" and worker["worker_status"] == "idle"
        assert all((run_dir / f"{name}.log").exists() for name in ("gateway", "supervisor", "worker_0"))
        again = subprocess.run(["bash", "start_all.sh", "--config", str(config_path)], cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=120)
        assert again.returncode == 1 and "already running" in again.stderr
    finally:
        stopped = subprocess.run(["bash", "start_all.sh", "stop", "--config", str(config_path)], cwd=REPO,
                                 capture_output=True, text=True, timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped 3 process(es)" in stopped.stdout
    for pid in pids.values():
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    assert not list(run_dir.glob("*.pid"))
