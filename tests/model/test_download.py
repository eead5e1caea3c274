"""The download path, for real: `--model kyutai/...` through huggingface_hub and moshi's
CheckpointInfo.from_hf_repo, against a stand-in hub on loopback (tests/hub.py) that serves the tiny
checkpoints in the layout of Kyutai's repos. Each load runs in a fresh process, as a start does
(the hub client reads HF_ENDPOINT and HF_HOME when it is imported)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moshi_engine.wire.protocol import CloseCode
from moshi_engine.wire.remote import exchange
from tests.conftest import PROXY_VARIABLES
from tests.hub import BF16, GATED, MIMI_NAME, MOSHI_NAME, Q8, TOKENIZER_NAME, cached_files, incomplete_files, serve_hub
from tests.model.test_checkpoint import REPOSITORY

# What a start does before it serves: resolve and load the checkpoint (as the model process does).
# The hub client writes what it downloads in 10 MB chunks, so a cut-off download of Moshiko's
# 15 GB keeps all but the last few MB; the tiny checkpoint's 1 MB would keep nothing, so the
# chunks are scaled down with it.
LOAD = """
import json, sys
from huggingface_hub import constants
constants.DOWNLOAD_CHUNK_SIZE = 64 * 1024
from moshi_engine.model.checkpoint import ModelUnavailableError
from moshi_engine.model.loading import load_weights
try:
    weights = load_weights(sys.argv[1], device="cpu")
except ModelUnavailableError as error:
    print(json.dumps({"error": str(error)}))
    sys.exit(2)
print(json.dumps({"precision": weights.precision, "parameters": weights.parameters}))
"""
DEAD_HUB = "http://127.0.0.1:9"  # nothing listens there: the hub is gone


def environment(hf_home: Path, endpoint: str, offline: bool = False) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name not in (*PROXY_VARIABLES, "HF_TOKEN")}
    return env | {"HF_HOME": str(hf_home), "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "1" if offline else "0",
                  "HF_HUB_DISABLE_TELEMETRY": "1"}


def start(repo: str, hf_home: Path, endpoint: str, offline: bool = False) -> tuple[dict, str]:
    """Load `repo` as a start does; (what it loaded or the error it stopped with, its stderr)."""
    run = subprocess.run([sys.executable, "-c", LOAD, repo], cwd=REPOSITORY, capture_output=True, text=True,
                         timeout=300, env=environment(hf_home, endpoint, offline))
    assert run.returncode in (0, 2), run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1]), run.stderr


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory):
    """kyutai/moshiko-pytorch-bf16 downloaded once into an HF_HOME, the hub then gone."""
    hf_home = tmp_path_factory.mktemp("hf-home")
    with serve_hub() as hub:
        loaded, stderr = start(BF16, hf_home, hub.url)
    return hf_home, loaded, stderr, hub


def test_a_first_start_downloads_kyutais_layout_into_hf_home_showing_progress(downloaded):
    hf_home, loaded, stderr, hub = downloaded
    assert loaded["precision"] == "float32"
    assert {MOSHI_NAME, MIMI_NAME, TOKENIZER_NAME, "config.json"} <= set(cached_files(hf_home, BF16))
    assert "100%" in stderr and MOSHI_NAME in stderr  # the hub client's progress bars
    assert [request.path for request in hub.requests if request.method == "GET"].count(MOSHI_NAME) == 1


def test_an_8_bit_repo_downloads_its_int8_weights_and_takes_mimi_from_the_bf16_repo(tmp_path):
    with serve_hub() as hub:
        loaded, _ = start(Q8, tmp_path, hub.url)
    assert loaded["precision"] == "int8"
    assert "model.q8.safetensors" in cached_files(tmp_path, Q8)
    assert {MIMI_NAME, TOKENIZER_NAME} <= set(cached_files(tmp_path, BF16))  # named hf://kyutai/...-bf16/...
    assert not hub.got(MOSHI_NAME)  # the bf16 weights are never fetched


@pytest.mark.parametrize("offline", [False, True], ids=["hub-unreachable", "HF_HUB_OFFLINE"])
def test_with_the_hub_gone_a_second_start_loads_from_the_cache(downloaded, offline):
    hf_home = downloaded[0]
    loaded, stderr = start(BF16, hf_home, DEAD_HUB, offline=offline)
    assert loaded.get("precision") == "float32", loaded
    if not offline:
        assert "cannot reach the Hugging Face hub" in stderr and "from the HF cache" in stderr


async def test_python_app_py_with_the_hub_gone_serves_the_model_it_downloaded_before(downloaded, hello_pcm):
    """A GPU box or a container whose network to the hub fails starts all the same."""
    from tests.test_app import start_app, stop_app

    hf_home = downloaded[0]
    env = environment(hf_home, DEAD_HUB)
    previous = {name: os.environ.get(name) for name in env}
    os.environ.update(env)  # start_app's child takes this process's environment
    try:
        process, base = start_app("--model", BF16, "--device", "cpu")
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    try:
        # a long tail: a loaded machine takes its time over the fresh model process's first steps
        result = await exchange(base.replace("http", "ws") + "/api/chat", hello_pcm[:24000], realtime=False,
                                tail_s=15.0)
        assert result.close_code == CloseCode.NORMAL and result.pcm.size > 0
    finally:
        output = stop_app(process)
    assert "loading kyutai/moshiko-pytorch-bf16 from the HF cache" in output


@pytest.mark.parametrize(("repo", "says"), [
    ("kyutai/no-such-moshi", "kyutai/no-such-moshi is not a public Hugging Face repo, or is gated"),
    (GATED, "set HF_TOKEN to a token that can read it"),
])
def test_a_repo_that_does_not_exist_or_is_gated_fails_naming_it_and_what_to_do(tmp_path, repo, says):
    with serve_hub() as hub:
        loaded, _ = start(repo, tmp_path, hub.url)
    assert says in loaded["error"] and "--model tiny" in loaded["error"]
    assert len(hub.requests) <= 2  # at once: no retries


def test_a_download_cut_off_midway_resumes_where_it_stopped(tmp_path):
    with serve_hub() as hub:
        hub.cuts[MOSHI_NAME] = 1
        loaded, _ = start(BF16, tmp_path, hub.url)
    assert loaded["precision"] == "float32"
    first, resumed = hub.got(MOSHI_NAME)
    assert first.start == 0 and resumed.start > 0  # only the rest was fetched again
    assert cached_files(tmp_path, BF16)[MOSHI_NAME].read_bytes() == hub.repos[BF16][MOSHI_NAME]


def test_a_download_that_keeps_being_cut_fails_clearly_keeps_what_came_and_a_later_start_finishes_it(tmp_path):
    with serve_hub() as hub:
        hub.cuts[MOSHI_NAME] = 100
        loaded, _ = start(BF16, tmp_path, hub.url)
        assert "could not download kyutai/moshiko-pytorch-bf16" in loaded["error"]
        assert "a new start resumes it" in loaded["error"]
        assert MOSHI_NAME not in cached_files(tmp_path, BF16)  # nothing truncated is ever loadable
        assert incomplete_files(tmp_path, BF16)  # what arrived is kept
        hub.cuts.clear()
        before = len(hub.got(MOSHI_NAME))
        loaded, _ = start(BF16, tmp_path, hub.url)
    assert loaded["precision"] == "float32"
    assert all(request.start > 0 for request in hub.got(MOSHI_NAME)[before:])  # resumed, not restarted
    assert cached_files(tmp_path, BF16)[MOSHI_NAME].read_bytes() == hub.repos[BF16][MOSHI_NAME]
    assert not incomplete_files(tmp_path, BF16)
