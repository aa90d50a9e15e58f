"""A headless Chromium far end: mqtt.js signaling over mosquitto websockets, WebRTC audio both ways.

The page (tests/browser/phone.html + phone.js) speaks protocol section 4, sends a
known tone from Chromium's fake capture device (a WAV the test writes) and
measures what it hears with a WebAudio AnalyserNode; Selenium reads the results
from window globals. Selenium calls block, so they run on a thread while the
agent keeps the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.server
import shutil
import statistics
import threading
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_support import collector
from alsa_support import active, hz_tolerance, level_dbfs, peak_hz, read_raw, tone
from call_support import alsa_env, endpoint_config, running, until

CHROMIUM = Path("/usr/lib/chromium/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
PAGE_DIR = Path(__file__).resolve().parent / "browser"
BROWSER_ID = "browser-1"
BROWSER_HZ = 660.0  # what Chromium's fake microphone plays
AGENT_HZ = 440.0  # what the agent's capture PCM holds
TONE_DBFS = -12.0

pytestmark = [
    pytest.mark.browser,
    pytest.mark.broker,
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
        reason=f"needs Debian chromium ({CHROMIUM}) and chromium-driver ({CHROMEDRIVER})",
    ),
]


def load_mqttjs() -> Path:
    """The pinned mqtt.js bundle vendored under tests/browser/vendor (checksum checked)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mqttjs", PAGE_DIR / "mqttjs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return Path(module.mqttjs_path())


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def page_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """phone.html, phone.js and mqtt.min.js served over http://127.0.0.1 from a thread."""
    root = tmp_path_factory.mktemp("www")
    for name in ("phone.html", "phone.js"):
        shutil.copy(PAGE_DIR / name, root / name)
    shutil.copy(load_mqttjs(), root / "mqtt.min.js")
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="phone-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/phone.html"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def write_wav(path: Path, freq: float, seconds: float) -> Path:
    samples = tone(freq, seconds, TONE_DBFS)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(48000)
        w.writeframes(samples.astype("<i2").tobytes())
    return path


@pytest.fixture(scope="module")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One headless Chromium for the module (flags from testbed.md), its mic a looping tone."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    work = tmp_path_factory.mktemp("chromium")
    wav = write_wav(work / "mic.wav", BROWSER_HZ, 60)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={work / 'profile'}",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}",
        "--allow-loopback-in-peer-connection",
        "--autoplay-policy=no-user-gesture-required",
    ):
        options.add_argument(flag)
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(work / "driver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_script_timeout(10)
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """The phone page in Chromium; every WebDriver call runs on a thread."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver

    async def js(self, script: str, *args: Any) -> Any:
        return await asyncio.to_thread(self.driver.execute_script, script, *args)

    async def phone(self) -> dict[str, Any]:
        return dict(await self.js("return window.phone || {}"))

    async def until(self, check: str, timeout: float = 15.0) -> Any:
        """Bounded polling of a JS expression over window.phone (no event crosses to Python)."""
        expr = f"const p = window.phone; return !!p && ({check});"
        try:
            async with asyncio.timeout(timeout):
                while not await self.js(expr):
                    await asyncio.sleep(0.1)
        except TimeoutError:
            state = await self.phone()
            raise AssertionError(f"page never met {check!r}: {state}") from None
        return await self.phone()


@contextlib.asynccontextmanager
async def phone_page(driver: Any, url: str, ws_port: int) -> Any:
    query = f"?broker=ws://127.0.0.1:{ws_port}&id={BROWSER_ID}&prefix=edge/v1"
    await asyncio.to_thread(driver.get, url + query)
    page = Page(driver)
    await page.until("p.ready && !p.error", timeout=15)
    try:
        yield page
    finally:
        with contextlib.suppress(Exception):  # leave the page idle for the next test
            await page.js("window.phoneHangup && window.phoneHangup('test_over')")
        await asyncio.to_thread(driver.get, "about:blank")


def summaries(messages: list, device: str) -> list[dict]:  # type: ignore[type-arg]
    return [
        m.json()
        for m in messages
        if m.topic.startswith(f"edge/v1/{device}/calls/") and m.topic.endswith("/summary")
    ]


def frames_heard(agent: Any) -> int:
    call = agent.calls_mgr.active
    if call is None or call.session is None or call.session.sink is None:
        return 0
    return int(call.session.sink.frames_received)


def sent_level_dbfs(messages: list) -> float:  # type: ignore[type-arg]
    """The agent's own capture level after its processing (AEC), from its quality messages."""
    levels = [
        m.json()["audio"]["tx_level_dbfs"]
        for m in messages
        if m.topic.endswith("/quality") and m.json().get("audio", {}).get("tx_level_dbfs")
    ]
    assert levels, "the agent published no quality message with a tx level"
    return float(statistics.median(levels))


def assert_browser_heard_agent(state: dict[str, Any], messages: list) -> None:  # type: ignore[type-arg]
    audio = state["audio"]
    assert audio is not None and audio["active_windows"] >= 8, state
    peak = statistics.median(audio["peaks"])
    level = statistics.median(audio["levels"])
    assert abs(peak - AGENT_HZ) <= 5, f"browser heard a peak at {peak} Hz: {audio['peaks']}"
    # The browser hears what the agent sent. That is below the capture file's -12 dBFS:
    # AEC3 in the agent takes ~6 dB off a steady tone while the far end's tone plays.
    sent = sent_level_dbfs(messages)
    assert abs(level - sent) <= 3, f"browser heard {level:.1f} dBFS, agent sent {sent:.1f}"
    assert level > -24, f"browser heard only {level:.1f} dBFS"


def assert_agent_heard_browser(tmp_path: Path, device: str) -> None:
    played = active(read_raw(tmp_path / f"spk_{device}.raw"))
    assert played.size >= 2 * 48000, f"{device} played only {played.size} samples"
    assert abs(peak_hz(played) - BROWSER_HZ) <= hz_tolerance(BROWSER_HZ), (
        f"{device}: peak {peak_hz(played)}"
    )
    assert abs(level_dbfs(played) - TONE_DBFS) <= 4, f"{device}: {level_dbfs(played):.1f} dBFS"


async def test_browser_calls_the_agent_with_audio_both_ways(
    tmp_path: Path,
    broker,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
    chromium: Any,
    page_url: str,
) -> None:
    alsa = alsa_env(tmp_path, monkeypatch)
    cfg = endpoint_config(tmp_path, broker.port, "dev-a", alsa, mic=tone(AGENT_HZ, 40))
    async with (
        collector(broker.port, "edge/v1/dev-a/#") as c,
        running(cfg) as agent,
        phone_page(chromium, page_url, broker.ws_port) as page,
    ):
        await page.js("window.phoneDial(arguments[0]); return true;", "dev-a")
        await until(lambda: agent.calls_mgr.active and agent.calls_mgr.active.state == "active")
        await page.until("p.state === 'active'")
        await until(lambda: frames_heard(agent) >= 150)  # 3 s of the browser's audio
        state = await page.until("p.audio && p.audio.active_windows >= 12")  # 3 s
        call_id = agent.calls_mgr.active.call_id
        assert state["callId"] == call_id
        await page.js("window.phoneHangup('local_hangup')")
        summary = (await c.wait_for(lambda ms: summaries(ms, "dev-a")))[0]

    assert state["events"][:3] == ["offering", "connecting", "active"], state["events"]
    assert summary["call_id"] == call_id and summary["peer"] == BROWSER_ID
    assert summary["direction"] == "incoming"
    assert (summary["result"], summary["end_reason"]) == ("completed", "remote_hangup")
    assert summary["ice"] == {"local_type": "host", "remote_type": "host"}
    assert_browser_heard_agent(state, c.messages)
    assert_agent_heard_browser(tmp_path, "dev-a")


async def test_agent_calls_the_browser_with_audio_both_ways(
    tmp_path: Path,
    broker,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
    chromium: Any,
    page_url: str,
) -> None:
    alsa = alsa_env(tmp_path, monkeypatch)
    cfg = endpoint_config(tmp_path, broker.port, "dev-a", alsa, mic=tone(AGENT_HZ, 40))
    async with (
        collector(broker.port, "edge/v1/dev-a/#") as c,
        running(cfg) as agent,
        phone_page(chromium, page_url, broker.ws_port) as page,
    ):
        call = await agent.calls_mgr.dial(BROWSER_ID)
        await until(lambda: agent.calls_mgr.active and agent.calls_mgr.active.state == "active")
        await page.until("p.state === 'active'")
        await until(lambda: frames_heard(agent) >= 150)
        state = await page.until("p.audio && p.audio.active_windows >= 12")
        await agent.calls_mgr.hangup()
        ended = await page.until("p.state === 'idle'", timeout=5)
        summary = (await c.wait_for(lambda ms: summaries(ms, "dev-a")))[0]

    assert state["callId"] == call.call_id and state["peer"] == "dev-a"
    assert state["events"][:3] == ["answering", "connecting", "active"], state["events"]
    assert ended["endReason"] == "remote_hangup"
    assert summary["call_id"] == call.call_id and summary["direction"] == "outgoing"
    assert (summary["result"], summary["end_reason"]) == ("completed", "local_hangup")
    assert summary["trace_id"] is not None
    assert_browser_heard_agent(state, c.messages)
    assert_agent_heard_browser(tmp_path, "dev-a")
