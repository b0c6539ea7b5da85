"""server/recording.py on its own: retention never deletes a live session's folder, and a failing disk
stops a recording without raising into the session."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

from common.config import RecordingConfig
from server.recording import RecordingStore

JPEG_BYTES = b"\xff\xd8\xff\xe0 not decoded by the recorder \xff\xd9"


def _store(tmp_path: Path, retention: int) -> RecordingStore:
    return RecordingStore(RecordingConfig(enabled=True, dir=str(tmp_path / "rec"), retention_sessions=retention))


def _chunk_with_frame() -> dict:
    return {"type": "audio_chunk", "audio_base64": base64.b64encode(b"\x00" * 64).decode(),
            "frame_base64_list": [base64.b64encode(JPEG_BYTES).decode()]}


def test_retention_keeps_the_folders_of_sessions_still_recording(tmp_path):
    store = _store(tmp_path, retention=1)
    first = store.open("first", "omni_duplex", "legacy", "ws://w0")
    second = store.open("second", "omni_duplex", "legacy", "ws://w1")  # over the retention of 1
    assert first.directory.is_dir() and second.directory.is_dir()
    first.to_worker(_chunk_with_frame())
    assert not first.failed and (first.directory / "frames" / "000000_0.jpg").read_bytes() == JPEG_BYTES
    first.close("stopped")
    second.close("stopped")
    third = store.open("third", "omni_duplex", "legacy", "ws://w0")  # both finished: both pruned
    assert store.sessions() == [third.directory]
    third.close("stopped")
    assert json.loads((third.directory / "session.json").read_text())["end_reason"] == "stopped"


def test_a_failing_disk_stops_the_recording_not_the_session(tmp_path):
    store = _store(tmp_path, retention=5)
    recorder = store.open("gone", "omni_duplex", "legacy", "ws://w0")
    shutil.rmtree(recorder.directory)  # as a full or vanished disk would fail the writes
    recorder.to_worker(_chunk_with_frame())
    assert recorder.failed
    recorder.from_worker({"type": "result", "audio_data": base64.b64encode(b"\x00" * 8).decode()})
    recorder.close("stopped")  # nothing raises, and the store forgets the session
    assert store.open("next", "omni_duplex", "legacy", "ws://w0") is not None
