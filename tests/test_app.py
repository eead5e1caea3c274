"""app.py: the Modal app inspected without credentials, and `python app.py` run for real."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import modal

from moshi_engine.audio import SAMPLE_RATE
from moshi_engine.model.checkpoint import TINY_DIR
from moshi_engine.wire.protocol import CloseCode
from moshi_engine.wire.remote import exchange
from tests.conftest import PROXY_VARIABLES
from tests.live import serve_asgi

ROOT = Path(__file__).resolve().parent.parent


def load_app_module(monkeypatch, **env: str):
    """Import app.py afresh with the given deploy-time environment, recording the arguments
    of every `app.cls` / `app.function` decorator it asks Modal for."""
    for name in [n for n in os.environ if n.startswith("MOSHI_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    asked: dict[str, dict] = {}

    def spy(real):
        def record(self, *args, **kwargs):
            decorate = real(self, *args, **kwargs)

            def wrapper(target):
                registered = decorate(target)
                asked[repr(registered).partition("(")[2].rstrip(")")] = kwargs  # Cls(Moshi) -> Moshi
                return registered

            return wrapper

        return record

    monkeypatch.setattr(modal.App, "cls", spy(modal.App.cls))
    monkeypatch.setattr(modal.App, "function", spy(modal.App.function))
    spec = importlib.util.spec_from_file_location("moshi_modal_app", ROOT / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, asked


def test_default_modal_app_is_one_sticky_gpu_class_serving_everything(monkeypatch):
    module, asked = load_app_module(monkeypatch)
    info = module.Moshi().web.info()
    assert info.gpus == [("L40S", 1)]
    assert info.volumes["/cache"].name == "moshi-hf-cache"
    assert info.concurrency_info.max_inputs >= 32  # the page's own requests
    assert list(info.method_details) == ["web"]  # the ASGI app
    assert info.timeout > module.SESSION_LIMIT_S
    assert asked["Moshi"]["max_containers"] == 1  # Gradio needs sticky sessions
    assert asked["Moshi"]["scaledown_window"] == 300
    assert set(asked) == {"Moshi"}
    assert not hasattr(module, "MoshiWorker")


def test_gpu_and_session_limit_are_read_at_deploy_time(monkeypatch):
    module, _ = load_app_module(monkeypatch, MOSHI_GPU="H100", MOSHI_SESSION_LIMIT_S="120")
    info = module.Moshi().web.info()
    assert info.gpus == [("H100", 1)]
    assert module.SESSION_LIMIT_S == 120 and info.timeout > 120
    assert module.CONFIG["MOSHI_GPU"] == "H100"  # copied into the image's environment


def test_each_gpu_admits_as_many_conversations_as_it_has_slots(monkeypatch):
    module, _ = load_app_module(monkeypatch)
    # auto on an L40S (48 GB): Moshiko's weights, then 1.6 GB per slot with headroom
    assert module.SLOTS == 17
    assert module.Moshi().web.info().concurrency_info.max_inputs >= 100 + 17
    module, _ = load_app_module(monkeypatch, MOSHI_GPU="H100")
    assert module.SLOTS == 32  # auto's ceiling
    module, _ = load_app_module(monkeypatch, MOSHI_SESSIONS="6")
    assert module.SLOTS == 6 and module.CONFIG["MOSHI_SESSIONS"] == "6"  # copied into the image


def test_each_container_reserves_the_cpu_and_memory_its_conversations_and_voices_need(monkeypatch):
    from moshi_engine.model.sizing import container_size

    module, asked = load_app_module(monkeypatch)  # an L40S: 17 slots of one voice, over the page's WebRTC
    l40s = container_size(17, voices=1, transport="webrtc")
    assert (asked["Moshi"]["cpu"], asked["Moshi"]["memory"]) == (l40s.cores, l40s.memory_mib)
    assert l40s.cores >= 2 and l40s.memory_mib >= 4096  # far above Modal's 0.125 core and 128 MiB
    module, asked = load_app_module(monkeypatch, MOSHI_GPU="H100")  # 32 slots: more of both
    assert asked["Moshi"]["cpu"] > l40s.cores and asked["Moshi"]["memory"] >= l40s.memory_mib
    module, asked = load_app_module(monkeypatch, MOSHI_SCALE_OUT="1", MOSHI_MAX_WORKERS="1")
    worker, page = asked["MoshiWorker"], asked["ui"]
    assert worker["cpu"] < l40s.cores  # its conversations come over the websocket, without the page's WebRTC
    # the page carries the worker's calls and relays each on: one process, as many as its core holds
    assert module.PAGE == container_size(min(17, module.PAGE_CALLS), voices=0, relayed=True)
    assert (page["cpu"], page["memory"]) == (module.PAGE.cores, module.PAGE.memory_mib)
    module, asked = load_app_module(monkeypatch, MOSHI_SCALE_OUT="1", MOSHI_MAX_WORKERS="10")
    assert asked["ui"]["cpu"] == container_size(module.PAGE_CALLS, voices=0, relayed=True).cores < 2


def test_an_8_bit_model_and_a_shorter_context_fit_more_conversations_on_a_24_gb_gpu(monkeypatch):
    module, _ = load_app_module(monkeypatch, MOSHI_GPU="L4")
    bf16 = module.SLOTS
    module, _ = load_app_module(monkeypatch, MOSHI_GPU="L4", MOSHI_MODEL="kyutai/moshiko-pytorch-q8")
    q8 = module.SLOTS
    module, _ = load_app_module(monkeypatch, MOSHI_GPU="L4", MOSHI_MODEL="kyutai/moshiko-pytorch-q8",
                                MOSHI_CONTEXT="1500")
    assert (bf16, q8, module.SLOTS) == (2, 7, 15)  # weights 15.4 / 8.0 GB; 1.6 / 0.8 GB a slot
    assert module.CONTEXT == 1500 and module.CONFIG["MOSHI_CONTEXT"] == "1500"  # copied into the image


def test_scale_out_puts_the_page_on_cpu_and_a_slotful_of_conversations_on_each_gpu_worker(monkeypatch):
    module, asked = load_app_module(monkeypatch, MOSHI_SCALE_OUT="1", MOSHI_MAX_WORKERS="7", MOSHI_SESSIONS="12")
    worker = module.MoshiWorker().web.info()
    # Modal routes a worker at most its 12 slots' worth of conversations, then starts another GPU
    assert worker.gpus == [("L40S", 1)] and worker.concurrency_info.max_inputs == 12
    assert worker.volumes["/cache"].name == "moshi-hf-cache"
    assert asked["MoshiWorker"]["max_containers"] == 7
    assert asked["MoshiWorker"]["scaledown_window"] == 300
    page = module.ui.info()
    assert page.gpus == [] and page.web_info is not None
    assert page.concurrency_info.max_inputs >= 32
    assert asked["ui"]["max_containers"] == 1
    assert not hasattr(module, "Moshi")
    assert module.worker_figures.name == "moshi-worker-metrics"  # where workers publish, the page reads


def test_a_scale_out_worker_publishes_its_figures_for_the_page_and_a_last_time_when_it_drains(monkeypatch,
                                                                                              tiny_engine):
    module, _ = load_app_module(monkeypatch, MOSHI_SCALE_OUT="1")
    store: dict = {}
    monkeypatch.setattr(module, "worker_figures", store)  # the modal.Dict, here a dict
    monkeypatch.setenv("MODAL_TASK_ID", "ta-test")
    user_class = module.MoshiWorker._get_user_cls()
    instance = user_class()
    instance.voices = tiny_engine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        user_class.__dict__["web"]._get_raw_f()(instance)  # what @modal.asgi_app serves
        assert 'moshi_slots{voice="tiny"} 2.0' in store["ta-test"]["text"]
        published = store["ta-test"]["at"]
        user_class.__dict__["drain"]._get_raw_f()(instance)  # what @modal.exit runs
    assert store["ta-test"]["at"] > published


def test_the_modal_class_serves_the_same_app_factory_as_python_app_py(monkeypatch, tiny_engine, hello_pcm):
    module, _ = load_app_module(monkeypatch)
    user_class = module.Moshi._get_user_cls()  # the plain class Modal instantiates in the container
    instance = user_class()
    monkeypatch.setattr(module, "load_warm_voices", lambda: tiny_engine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        user_class.__dict__["load"]._get_raw_f()(instance)  # what @modal.enter runs
        asgi = user_class.__dict__["web"]._get_raw_f()(instance)  # what @modal.asgi_app serves
    with serve_asgi(asgi) as base:
        assert_serves_page_status_and_a_session(base, hello_pcm)


def assert_serves_page_status_and_a_session(base: str, hello_pcm) -> None:
    import asyncio

    with urllib.request.urlopen(base + "/", timeout=30) as page:
        assert page.status == 200 and "Moshi" in page.read().decode()
    with urllib.request.urlopen(base + "/status", timeout=30) as status:
        assert json.load(status)["status"] == "ready"
    result = asyncio.run(exchange(base.replace("http", "ws") + "/ws", hello_pcm[:SAMPLE_RATE], realtime=False))
    assert result.pcm.size > 0 and result.close_code == CloseCode.NORMAL


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(*args: str, before: str = "") -> tuple[subprocess.Popen, str]:
    """`python app.py --port P ARGS`; with `before`, that Python runs first in app.py's process."""
    port = free_port()
    start = ["app.py"]
    if before:
        run_app = "import runpy, sys\nsys.argv[0] = 'app.py'\nrunpy.run_path('app.py', run_name='__main__')"
        start = ["-c", f"{before}\n{run_app}"]
    process = subprocess.Popen(
        [sys.executable, *start, "--port", str(port), *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"app.py exited with {process.returncode}:\n{process.stdout.read()}")
        try:
            with urllib.request.urlopen(base + "/status", timeout=2):
                return process, base
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError("app.py did not answer /status in time")


def stop_app(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    return output


def test_python_app_py_serves_the_page_and_sessions_and_stops_cleanly_on_sigint(hello_pcm):
    import psutil

    process, base = start_app("--model", "tiny", "--device", "cpu")
    try:
        assert_serves_page_status_and_a_session(base, hello_pcm)
        (model_process,) = psutil.Process(process.pid).children()  # the model steps in its own process
    finally:
        output = stop_app(process)
    assert "Traceback" not in output
    assert not model_process.is_running()  # and it stopped with the app


def test_python_app_py_stops_with_status_1_when_its_model_cannot_be_restarted(tmp_path):
    import psutil

    checkpoint = tmp_path / "tiny-moshi"
    shutil.copytree(TINY_DIR, checkpoint)
    # The waits between tries cut from 1, 2, 4, 8 and 16 s (31 s of sleeping) to 0.1 s each.
    fast_retries = "import moshi_engine.model.process as process\nprocess.RESTART_DELAYS_S = (0.1, 0.1)"
    process, base = start_app("--model", str(checkpoint), "--device", "cpu", before=fast_retries)
    try:
        (model_process,) = psutil.Process(process.pid).children()
        shutil.rmtree(checkpoint)  # the weights are gone: no new model process can load them
        model_process.kill()
        output, _ = process.communicate(timeout=300)  # five tries
    finally:
        process.kill()
    assert process.returncode == 1, output
    assert "could not be restarted (5 tries" in output and "stopping the server" in output


def test_without_network_the_default_model_fails_fast_naming_tiny(tmp_path):
    env = {name: value for name, value in os.environ.items() if name not in PROXY_VARIABLES}
    env |= {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}  # nothing listens there

    def failing_start(*args: str) -> tuple[subprocess.CompletedProcess, float]:
        started = time.monotonic()
        run = subprocess.run([sys.executable, "app.py", "--port", str(free_port()), *args], cwd=ROOT,
                             capture_output=True, text=True, timeout=120, env=env)
        return run, time.monotonic() - started

    run, seconds = failing_start()
    assert run.returncode == 2
    assert "--model tiny" in run.stderr
    # Against the same start failing on an empty directory, which never reaches for the
    # network: the imports cost both the same, however fast this machine. Without the
    # engine's check the hub client alone would retry for about 50 s.
    empty_directory, baseline_seconds = failing_start("--model", str(tmp_path))
    assert empty_directory.returncode == 2
    assert seconds - baseline_seconds < 10


def test_a_real_model_on_cpu_warns_that_speech_will_not_be_real_time(tmp_path):
    run = subprocess.run(
        [sys.executable, "app.py", "--port", str(free_port()), "--device", "cpu", "--model", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert "will not speak in real time" in run.stderr
    assert run.returncode == 2  # an empty directory is no checkpoint


def test_remote_mode_page_carries_a_browser_conversation_to_a_second_server():
    """`python app.py --remote`: the page alone, in its own process, binding a browser's
    conversation to another `python app.py` over the Opus websocket."""
    from playwright.sync_api import sync_playwright

    from moshi_engine.bench.browser import STOP_BUTTON
    from tests.page.test_browser import (
        CHROMIUM,
        CHROMIUM_ARGS,
        INBOUND_AUDIO,
        TALK_BUTTON,
        TOKEN,
        open_page,
        wait_until,
    )

    moshi, moshi_url = start_app("--model", "tiny", "--device", "cpu")
    page_only = None
    try:
        # private: the page alone keeps its own token, and the browser opens it with it
        page_only, page_url = start_app("--remote", moshi_url.replace("http", "ws") + "/api/chat", "--token", TOKEN)
        with urllib.request.urlopen(page_url + "/status", timeout=10) as response:
            assert json.load(response)["mode"] == "remote"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = open_page(browser, page_url, TOKEN)
            page.click(TALK_BUTTON)
            page.wait_for_function(
                "() => document.querySelector('#moshi-transcript textarea').value.trim().length > 0", timeout=60_000
            )
            # Moshi's voice arrives: polled here, as wait_for_function takes an async predicate's Promise for true.
            wait_until(lambda: page.evaluate(INBOUND_AUDIO)["packets"] > 25, timeout=30)
            assert moshi_status(moshi_url)["sessions"]["active"] == 1  # the second server holds the call
            page.click(TALK_BUTTON)  # stop
            wait_for_idle(moshi_url)
            # the page's websocket path (its fallback from WebRTC), relayed to the second server
            over_websocket = browser.new_page()  # a visitor of its own: the private link, forcing the websocket
            over_websocket.goto(f"{page_url}/?token={TOKEN}&transport=websocket")
            over_websocket.click("#moshi-webrtc button", timeout=30_000)  # "Click to Access Microphone"
            over_websocket.click(TALK_BUTTON, timeout=30_000)
            over_websocket.wait_for_function(
                "() => document.querySelector('#moshi-transcript textarea').value.trim().length > 0", timeout=60_000
            )
            assert moshi_status(moshi_url)["sessions"]["active"] == 1
            over_websocket.click(STOP_BUTTON)
            wait_for_idle(moshi_url)
            browser.close()
        status = moshi_status(moshi_url)
        assert status["sessions"]["active"] == 0 and status["connections_served"] >= 2
        # each side counts what it served: the page its WebRTC call, the server both (the relayed
        # websocket too), and /metrics stays open on the private page
        assert counted(page_url, ("webrtc", "normal"), 1) == 1
        assert counted(moshi_url, ("api/chat", "normal"), 2) == 2
    finally:
        if page_only is not None:
            stop_app(page_only)
        stop_app(moshi)


def counted(base: str, key: tuple[str, str], expected: int) -> float:
    """moshi_conversations_total{transport, ending} of `key`, once it reaches `expected` (a server
    counts a conversation as it finishes with it, a moment after the client left) or 10 s on."""
    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.monotonic() + 10
    while True:
        with urllib.request.urlopen(base + "/metrics", timeout=10) as response:
            families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
        value = sum(s.value for s in families["moshi_conversations"].samples
                    if s.name.endswith("_total") and (s.labels["transport"], s.labels["ending"]) == key)
        if value >= expected or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def wait_for_idle(base: str) -> None:
    deadline = time.monotonic() + 15
    while moshi_status(base)["sessions"]["active"] and time.monotonic() < deadline:
        time.sleep(0.1)


def moshi_status(base: str) -> dict:
    with urllib.request.urlopen(base + "/status", timeout=10) as response:
        return json.load(response)


def test_python_app_py_https_makes_a_certificate_and_serves_the_page_over_it(tmp_path):
    """(That a later start reuses the certificate is tests/wire/test_tls.py's.)"""
    certfile = tmp_path / "moshi-voice-chat" / "tls" / "cert.pem"
    port = free_port()
    # The certificate is written before the model loads; until it is there, trust nothing.
    process = subprocess.Popen(
        [sys.executable, "app.py", "--model", "tiny", "--device", "cpu", "--in-process", "--https",
         "--host", "0.0.0.0", "--port", str(port)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=os.environ | {"XDG_CACHE_HOME": str(tmp_path)})
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None and time.monotonic() < deadline, "app.py did not serve https"
            try:
                trusting = ssl.create_default_context(cafile=str(certfile))
                with urllib.request.urlopen(f"https://localhost:{port}/", timeout=2, context=trusting) as page:
                    assert b"moshi-page-config" in page.read()
                break
            except (OSError, ssl.SSLError):
                time.sleep(0.2)
    finally:
        output = stop_app(process)
    assert "Moshi voice chat at https://" in output and "self-signed (made now" in output
    assert "no microphone" not in output  # https: browsers elsewhere get one


def test_python_app_py_on_every_address_over_http_warns_that_other_machines_get_no_microphone():
    process, _ = start_app("--model", "tiny", "--device", "cpu", "--in-process", "--host", "0.0.0.0")
    output = stop_app(process)
    assert "WARNING" in output and "get no microphone" in output and "--https" in output


def test_share_without_internet_says_so_and_still_serves_locally(hello_pcm):
    process, base = start_app("--model", "tiny", "--device", "cpu", "--share")
    try:
        assert_serves_page_status_and_a_session(base, hello_pcm)
    finally:
        output = stop_app(process)
    # Gradio's share server is unreachable from here (no internet); with it, a link is logged.
    assert "could not open a share link" in output or "public share link: https://" in output


async def test_sigterm_tells_every_conversation_and_everyone_in_line_why_and_exits_cleanly(hello_pcm):
    import asyncio

    from websockets.asyncio.client import connect

    from moshi_engine.wire.codec import OpusEncoder
    from moshi_engine.wire.protocol import HANDSHAKE, KIND_METADATA

    process, base = await asyncio.to_thread(start_app, "--model", "tiny", "--device", "cpu", "--sessions", "1")
    try:
        url = base.replace("http", "ws") + "/api/chat"
        talking = await connect(url)
        assert await talking.recv() == HANDSHAKE
        encoder = OpusEncoder()
        for start in range(0, 10 * 1920, 1920):
            await talking.send(b"\x01" + encoder.encode(hello_pcm[start : start + 1920]))
        waiting = await connect(url + "?queue=1")
        assert (await waiting.recv())[0] == KIND_METADATA  # in line
        process.send_signal(signal.SIGTERM)
        for ws in (talking, waiting):
            await asyncio.wait_for(ws.wait_closed(), 10)
            assert ws.close_code == CloseCode.SERVICE_RESTART and "restarting" in ws.close_reason
        output, _ = await asyncio.to_thread(process.communicate, timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert "Traceback" not in output and "telling every conversation" in output
