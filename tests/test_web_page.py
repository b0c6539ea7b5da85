"""The browser page (server/static) in Debian's chromium, driven by Playwright, with fake devices.

Chromium's fake microphone plays a WAV and its fake camera a .y4m, both converted from
assets/warmup.mp4 with the real ffmpeg. The page is tested against `ProtocolScriptServer`
(tests/test_cli_client.py: a real server answering the legacy protocol with a fixed script), and end
to end against the real gateway + worker.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.gateway_helpers import running_stack
from tests.test_cli_client import ProtocolScriptServer, serve

REPO_ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT_DIR = Path("/tmp")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")


@pytest.fixture(scope="module")
def fake_media(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(WAV for the fake microphone, Y4M for the fake camera) made from the warm-up MP4."""
    source = REPO_ROOT / "assets" / "warmup.mp4"
    if not source.is_file():
        pytest.skip("assets/warmup.mp4 is missing (make it with bash assets/make_warmup_mp4.sh)")
    folder = tmp_path_factory.mktemp("fake_devices")
    wav, y4m = folder / "mic.wav", folder / "camera.y4m"
    ffmpeg = ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(source)]
    subprocess.run(ffmpeg + ["-vn", "-ac", "1", "-ar", "48000", "-c:a", "pcm_s16le", str(wav)], check=True, timeout=60)
    subprocess.run(ffmpeg + ["-an", "-r", "10", "-pix_fmt", "yuv420p", str(y4m)], check=True, timeout=60)
    return wav, y4m


@pytest.fixture(scope="module")
def browser(fake_media: tuple[Path, Path]) -> Iterator[object]:
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    wav, y4m = fake_media
    args = [
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}", f"--use-file-for-fake-video-capture={y4m}",
        "--autoplay-policy=no-user-gesture-required",
        "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync",
    ]
    with sync_api.sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=str(CHROMIUM), args=args)
        yield instance
        instance.close()


def _run_page(browser: object, url: str, mode: str, units: int, barge_in: bool = False) -> dict:
    """Open the page, start a session in `mode`, wait for `units` results; returns window.__omni and DOM state."""
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    console: list[str] = []
    page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
    page.on("pageerror", lambda error: console.append(f"pageerror: {error}"))
    page.goto(url)
    page.check(f"#mode input[value={mode}]")
    page.click("#start")
    try:
        page.wait_for_function(f"window.__omni.results >= {units}", timeout=60_000)
        if barge_in:
            page.click("#barge-in")
            page.wait_for_function(f"window.__omni.results >= {units + 2}", timeout=30_000)
    except sync_api.TimeoutError as e:
        raise AssertionError(f"page made no progress: {page.evaluate('window.__omni')}\n" + "\n".join(console)) from e
    state = page.evaluate("window.__omni")
    state["units_text"] = page.inner_text("#m-units")
    state["wall_text"] = page.inner_text("#m-wall")
    state["cost_text"] = page.inner_text("#m-cost")
    state["transcript"] = page.inner_text("#transcript")
    state["model_state"] = page.inner_text("#model-state")
    state["console"] = console
    page.screenshot(path=str(SCREENSHOT_DIR / f"omni_web_page_{mode}.png"))
    page.click("#stop")
    page.wait_for_function("window.__omni.state === 'stopped'", timeout=10_000)
    page.close()
    return state


def test_page_and_assets_are_served_without_external_urls() -> None:
    with serve(ProtocolScriptServer().app) as base:
        index = httpx.get(f"{base}/")
        assets = {name: httpx.get(f"{base}/static/{name}")
                  for name in ("app.js", "audio-capture-worklet.js", "style.css")}
        traversal = httpx.get(f"{base}/static/..%2Fweb.py")
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    assert all(r.status_code == 200 for r in assets.values())
    assert "javascript" in assets["app.js"].headers["content-type"]
    assert "javascript" in assets["audio-capture-worklet.js"].headers["content-type"]
    assert traversal.status_code == 404
    for text in [index.text] + [r.text for r in assets.values()]:
        assert "http://" not in text and "https://" not in text, "the page must not load anything external"


def test_omni_page_streams_mic_and_camera_and_plays_speech(browser: object) -> None:
    script = ProtocolScriptServer()
    with serve(script.app) as base:
        state = _run_page(browser, f"{base}/?api_key=page-key", "omni", units=4, barge_in=True)

    conn = script.connections[0]
    assert conn.path.startswith("/ws/duplex/omni_")
    assert conn.query.get("api_key") == "page-key"
    types = [m["type"] for m in conn.messages]
    assert types[0] == "prepare" and types[-1] == "stop" and types.count("audio_chunk") >= 6
    assert conn.messages[0]["system_prompt"] == "You are a helpful assistant."
    assert all(c.samples == 16000 for c in conn.chunks)
    assert max(c.rms for c in conn.chunks) > 0.01, "the fake microphone's speech must reach the server"
    assert all(len(c.frame_sizes) == 1 and c.frame_sizes[0][0] >= 320 for c in conn.chunks)
    forced = [c.force_listen for c in conn.chunks]
    first_forced = forced.index(True)
    assert forced[first_forced:first_forced + 2] == [True, True] and forced.count(True) == 2, forced

    assert state["results"] >= 6 and state["units_text"] == str(state["units"]) == str(state["results"] - 1)
    assert state["wall_text"].endswith("ms") and state["cost_text"].endswith("ms")
    assert state["scheduledBuffers"] >= 1, "speaking results must be scheduled for playback"
    assert state["flushes"] == 1
    assert "w2 w3" in state["transcript"]
    assert not [line for line in state["console"] if line.startswith(("error", "pageerror"))], state["console"]


def test_audio_only_page_sends_no_frames(browser: object) -> None:
    script = ProtocolScriptServer()
    with serve(script.app) as base:
        state = _run_page(browser, f"{base}/", "audio", units=3)
    conn = script.connections[0]
    assert conn.path.startswith("/ws/duplex/adx_")
    assert "api_key" not in conn.query
    assert conn.chunks and all(c.frame_sizes == [] for c in conn.chunks)
    assert state["scheduledBuffers"] >= 1


@pytest.mark.timeout(600)
def test_page_end_to_end_against_real_gateway_and_worker(browser: object, tmp_path: Path) -> None:
    with running_stack(tmp_path) as base:
        state = _run_page(browser, f"{base}/", "omni", units=5)
    assert state["units"] >= 4 and state["units_text"] == str(state["units"])
    assert state["wall_text"].endswith("ms")
