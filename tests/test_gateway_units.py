"""Gateway pieces that need no running process: queue order and ETA, v2 -> legacy translation,
session ids, the Dockerfile lint, and the rule that the gateway never imports torch."""

import subprocess
import sys
from pathlib import Path

import pytest

from server.legacy import sanitize_session_id, session_kind
from server.pool import WorkerPool
from server.queue import DurationEstimator, QueueFull, SessionQueue
from server.realtime import prepare_from_init

REPO = Path(__file__).resolve().parent.parent


def test_duration_estimate_uses_baseline_until_three_samples_then_ema():
    durations = DurationEstimator()
    assert durations.expected_s("audio_duplex") == 120.0
    assert durations.expected_s("omni_duplex") == 90.0
    durations.record("audio_duplex", 10.0)
    durations.record("audio_duplex", 20.0)
    assert durations.expected_s("audio_duplex") == 120.0  # 2 samples: still the baseline
    durations.record("audio_duplex", 30.0)
    # EMA alpha 0.3: 10 -> 0.3*20 + 0.7*10 = 13 -> 0.3*30 + 0.7*13 = 18.1
    assert durations.expected_s("audio_duplex") == pytest.approx(18.1)
    assert durations.expected_s("omni_duplex") == 90.0


async def test_queue_positions_eta_and_limit():
    queue = SessionQueue(max_size=3, durations=DurationEstimator())
    first = queue.push("a", "omni_duplex")
    second = queue.push("adx_b", "audio_duplex")
    third = queue.push("c", "omni_duplex")
    fourth = queue.push("d", "omni_duplex")
    assert [queue.over_limit(t) for t in (first, second, third, fourth)] == [False, False, False, True]
    assert queue.remove(fourth) is True
    assert [queue.position(t) for t in (first, second, third)] == [1, 2, 3]
    assert first.ticket_id.startswith("q_") and len(first.ticket_id) == 14
    # one running session with 30 s left, one slot: wait = 30 + sessions ahead
    assert queue.estimated_wait_s(first, [30.0], capacity=1) == 30.0
    assert queue.estimated_wait_s(third, [30.0], capacity=1) == 30.0 + 90.0 + 120.0
    assert queue.estimated_wait_s(third, [30.0], capacity=2) == 30.0 + (90.0 + 120.0) / 2
    assert queue.remove(second) is True
    assert queue.position(third) == 2 and queue.position(second) == 0
    assert queue.pop_first() is first and len(queue) == 1


async def test_slot_is_freed_only_by_a_fresh_idle_report_from_the_worker():
    pool = WorkerPool(["127.0.0.1:1"], capacity=1, max_queue_size=4, health_poll_s=1.0, dead_after_s=5.0)
    worker = pool.workers[0]
    assert worker.url == "http://127.0.0.1:1"
    ready = {"status": "healthy", "model_loaded": True, "worker_status": "idle", "current_session_id": None}
    worker.offline, worker.health = False, ready
    first = pool.request("s1", "omni_duplex")
    second = pool.request("s2", "omni_duplex")
    assignment = first.assigned.result()  # the slot is taken before the ticket resolves
    assert worker.state == "busy" and not second.assigned.done() and pool.queue.position(second) == 1
    assert assignment.worker_ws_url() == "ws://127.0.0.1:1/ws/duplex?session_id=s1&kind=omni_duplex"

    pool.release(assignment)
    closed_at = worker.releasing[assignment.ticket_id][1]
    pool._confirm_releases(worker, ready, asked_at=closed_at - 0.01)  # stale: asked before the close
    active = {**ready, "worker_status": "duplex_active", "current_session_id": "s1"}
    pool._confirm_releases(worker, active, asked_at=closed_at + 0.01)  # still running s1
    cleaning = {**ready, "worker_status": "cleaning_up"}
    pool._confirm_releases(worker, cleaning, asked_at=closed_at + 0.02)
    pool._dispatch()
    assert worker.state == "releasing" and not second.assigned.done()
    pool._confirm_releases(worker, ready, asked_at=closed_at + 0.03)
    pool._dispatch()
    assert second.assigned.result().session_id == "s2" and worker.state == "busy"


async def test_a_queue_of_size_zero_admits_while_a_slot_is_free():
    pool = WorkerPool(["127.0.0.1:1"], capacity=1, max_queue_size=0, health_poll_s=1.0, dead_after_s=5.0)
    worker = pool.workers[0]
    worker.offline = False
    worker.health = {"status": "healthy", "model_loaded": True, "worker_status": "idle", "current_session_id": None}
    assert pool.request("s1", "omni_duplex").assigned.result().session_id == "s1"
    with pytest.raises(QueueFull, match=r"Queue full \(0 requests\)"):
        pool.request("s2", "omni_duplex")  # it would have to wait
    assert len(pool.queue) == 0


def test_session_id_sanitised_and_typed():
    assert sanitize_session_id("adx_../../etc passwd!") == "adx_etcpasswd"
    assert len(sanitize_session_id("x" * 500)) == 128
    assert session_kind("adx_k2f9") == "audio_duplex"
    assert session_kind("omni_k2f9") == "omni_duplex"
    assert session_kind("e2e_d1") == "omni_duplex"


def test_session_init_translates_to_prepare():
    init = {
        "type": "session.init",
        "payload": {
            "system_prompt": "Be brief.",
            "config": {"length_penalty": 1.2, "max_tokens": 50, "temperature": 0.5, "max_kv_tokens": 4096,
                       "tts_enabled": False, "vision_hd": True, "something_new": 1},
            "voice": {"ref_audio_base64": "AAAA", "tts_ref_audio_base64": ""},
        },
    }
    assert prepare_from_init(init) == {
        "type": "prepare",
        "system_prompt": "Be brief.",
        "config": {"length_penalty": 1.2, "max_tokens": 50, "temperature": 0.5, "max_kv_tokens": 4096,
                   "something_new": 1, "generate_audio": False},
        "ref_audio_base64": "AAAA",
        "max_slice_nums": 2,
    }
    explicit = prepare_from_init({"payload": {"config": {"vision_hd": True}, "max_slice_nums": 4}})
    assert explicit["max_slice_nums"] == 4
    assert prepare_from_init({"type": "session.init"}) == {"type": "prepare", "config": {}}


def test_gateway_never_imports_torch():
    code = "import sys, server.app, server.__main__, server.wait_workers; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (REPO / "Dockerfile").read_text()
    for required in ("FROM nvidia/cuda:", "USER 10001", "ffmpeg", "HEALTHCHECK", "start_all.sh", "--foreground",
                     "/app/torch_compile_cache", "/models", "/app/data"):
        assert required in text, required
