"""Where a model comes from: a Hugging Face repo, a local checkpoint directory, or `tiny`.

Everything resolves to moshi's own `CheckpointInfo`, so the real loaders
(`get_mimi`, `get_moshi`, `get_text_tokenizer`, `lm_gen_config`) build the models
whatever the source. A local directory uses the layout of Kyutai's newer repos:
`config.json` (LM kwargs plus `moshi_name`, `mimi_name`, `tokenizer_name`,
optionally `mimi_config_name` and `lm_gen_config`) beside the files it names.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

from moshi.models import loaders

from .sizing import moshi_7b_weights_bytes

log = logging.getLogger(__name__)

DEFAULT_MODEL = loaders.DEFAULT_REPO  # kyutai/moshiko-pytorch-bf16
TINY = "tiny"
TINY_Q8 = "tiny-q8"  # the tiny checkpoint quantized to 8 bits as Kyutai's q8 repos are (`quantize`)
RANDOM = "random"  # the full-size Moshiko architecture with random weights: no download
RANDOM_Q8 = "random-q8"  # the same with its Linear layers quantized to int8 as built, as in Kyutai's q8 repos
ASSETS_DIR = Path(__file__).resolve().parents[2] / "assets"
TINY_DIR = ASSETS_DIR / "tiny-moshi"
TINY_Q8_DIR = ASSETS_DIR / "tiny-moshi-q8"
CONFIG_NAME = "config.json"
_OFFLINE_HINT = f"For an offline demo use the bundled random checkpoint: --model {TINY}."
DOWNLOAD_TRIES = 3  # a download cut off midway is resumed this many times in one start
PROGRESS_INTERVAL_S = 10  # how often a download's progress is written to a log that is no terminal


class ModelUnavailableError(RuntimeError):
    """The model spec names nothing that can be loaded from here."""


def resolve_checkpoint(spec: str) -> loaders.CheckpointInfo:
    """Turn a model spec into a CheckpointInfo, downloading (with progress bars) if needed.

    `spec` is `tiny`, `tiny-q8`, `random`, `random-q8`, a local checkpoint directory, or a Hugging Face
    repo id such as `kyutai/moshiko-pytorch-bf16`. Downloads go to the HF cache
    (HF_HOME), so a second start loads from disk.
    """
    if spec == TINY:
        return checkpoint_from_directory(TINY_DIR)
    if spec == TINY_Q8:
        return checkpoint_from_directory(TINY_Q8_DIR)
    if spec == RANDOM:
        # No weight files: moshi's loaders build Moshiko's 7B and Mimi's default configs
        # uninitialised. Text ids beyond the tiny tokenizer are skipped by the engine.
        return loaders.CheckpointInfo(moshi_weights=None, mimi_weights=None, tokenizer=TINY_DIR / "tokenizer.model")
    if spec == RANDOM_Q8:
        # Kyutai's q8 config over Moshiko's architecture: moshi builds QLinear layers from the
        # random weights (no file to load, so the scales are float32 as made).
        return loaders.CheckpointInfo(moshi_weights=None, mimi_weights=None, tokenizer=TINY_DIR / "tokenizer.model",
                                      lm_config={**loaders._lm_kwargs, "quantize": True})
    path = Path(spec).expanduser()
    if path.is_dir():
        return checkpoint_from_directory(path)
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModelUnavailableError(
            f"model {spec!r} is neither a checkpoint directory nor a Hugging Face repo id "
            f"(owner/name, e.g. {DEFAULT_MODEL}). {_OFFLINE_HINT}"
        )
    return checkpoint_from_hub(spec)


def weights_bytes(spec: str) -> int:
    """About what `spec`'s weights take on a GPU, before loading them: the size of its LM and
    Mimi files (stored in the precision they load in: bf16, or int8 for a q8 checkpoint), or
    for `random` / `random-q8` moshi 7B's count. Resolves (downloads) the checkpoint."""
    if spec in (RANDOM, RANDOM_Q8):
        return moshi_7b_weights_bytes(quantized=spec == RANDOM_Q8)
    checkpoint = resolve_checkpoint(spec)
    files = [checkpoint.moshi_weights, checkpoint.mimi_weights]
    return sum(Path(path).stat().st_size for path in files if path is not None and Path(path).is_file())


def checkpoint_from_directory(directory: Path) -> loaders.CheckpointInfo:
    """A local checkpoint directory through moshi's CheckpointInfo, like a downloaded repo.

    Without a config.json it is taken for a snapshot of a legacy repo (Moshiko /
    Moshika 7B): moshi's default file names and configs.
    """
    config_path = directory / CONFIG_NAME
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    named = {
        "moshi_weights": config.get("moshi_name", loaders.MOSHI_NAME),
        "mimi_weights": config.get("mimi_name", loaders.MIMI_NAME),
        "tokenizer": config.get("tokenizer_name", loaders.TEXT_TOKENIZER_NAME),
        "mimi_config_path": config.get("mimi_config_name"),
        "lora_weights": config.get("lora_name"),
    }
    files = {key: directory / name for key, name in named.items() if name}
    missing = [path.name for path in files.values() if not path.is_file()]
    if missing:
        raise ModelUnavailableError(f"checkpoint directory {directory} lacks {', '.join(missing)}. {_OFFLINE_HINT}")
    if not config:
        return loaders.CheckpointInfo(files["moshi_weights"], files["mimi_weights"], files["tokenizer"])
    # Every file is given as a local Path, so CheckpointInfo never reaches for the hub.
    return loaders.CheckpointInfo.from_hf_repo(str(directory), config_path=config_path, **files)


def checkpoint_from_hub(repo: str) -> loaders.CheckpointInfo:
    """A Kyutai repo through moshi's CheckpointInfo: downloaded into the HF cache (HF_HOME) with
    the hub client's progress bars, or read from that cache.

    With the hub out of reach (no network on a GPU box, a container behind a firewall) or
    HF_HUB_OFFLINE=1, a repo already in the cache loads from it. A download cut off midway is
    resumed where it stopped, up to DOWNLOAD_TRIES times; the hub client keeps what arrived in
    the cache (`.incomplete`) and moves a file into place only once it is whole, so a truncated
    file is never loaded, and a later start resumes it too.
    """
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )
    from requests.exceptions import RequestException

    offline = constants.HF_HUB_OFFLINE
    if not offline and not _hub_reachable(constants.ENDPOINT):
        # Without this check the hub client retries for ~20 s per file before reading its cache.
        log.warning("cannot reach the Hugging Face hub (%s): loading %s from the HF cache (%s)",
                    constants.ENDPOINT, repo, constants.HF_HUB_CACHE)
        offline = True
    for attempt in range(1, DOWNLOAD_TRIES + 1):
        try:
            with _hub_offline(offline), _progress_in_logs():
                return loaders.CheckpointInfo.from_hf_repo(repo)
        except (GatedRepoError, RepositoryNotFoundError) as error:
            raise ModelUnavailableError(
                f"{repo} is not a public Hugging Face repo, or is gated: check the name, "
                f"or set HF_TOKEN to a token that can read it. {_OFFLINE_HINT}"
            ) from error
        except LocalEntryNotFoundError as error:
            why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE
                   else f"cannot reach the Hugging Face hub ({constants.ENDPOINT}) to fetch {repo}")
            raise ModelUnavailableError(
                f"{why}, and {repo} is not (wholly) in the HF cache ({constants.HF_HUB_CACHE}). {_OFFLINE_HINT}"
            ) from error
        except EntryNotFoundError as error:
            raise ModelUnavailableError(f"{repo} lacks a file that its config names: {error}") from error
        except (RequestException, OSError) as error:  # cut off, refused, timed out, or short
            if attempt < DOWNLOAD_TRIES:
                log.warning("downloading %s failed (%s); resuming (try %d of %d)", repo, error, attempt + 1,
                            DOWNLOAD_TRIES)
                continue
            raise ModelUnavailableError(
                f"could not download {repo} from the Hugging Face hub ({error}), {DOWNLOAD_TRIES} tries. What "
                f"arrived is kept in the HF cache ({constants.HF_HUB_CACHE}) and a new start resumes it. "
                f"{_OFFLINE_HINT}"
            ) from error
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _progress_in_logs():
    """The hub client's progress bars also where stderr is no terminal (a server's log on Modal,
    a Space or docker), where tqdm would hide them: a 15 GB download then says how far it is,
    once every PROGRESS_INTERVAL_S. `TQDM_POSITION=-1` is huggingface_hub's switch for that."""
    if sys.stderr.isatty() or "TQDM_POSITION" in os.environ:
        yield
        return
    os.environ.update(TQDM_POSITION="-1", TQDM_MININTERVAL=str(PROGRESS_INTERVAL_S))
    try:
        yield
    finally:
        for name in ("TQDM_POSITION", "TQDM_MININTERVAL"):
            os.environ.pop(name, None)


@contextlib.contextmanager
def _hub_offline(offline: bool):
    """The hub client's offline mode while this lasts, if `offline`: it then reads its cache
    alone. It reads the mode when it makes its HTTP sessions, so those are made anew."""
    from huggingface_hub import constants
    from huggingface_hub.utils import reset_sessions

    if not offline or constants.HF_HUB_OFFLINE:
        yield
        return
    constants.HF_HUB_OFFLINE = True
    reset_sessions()
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = False
        reset_sessions()


def _hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy decides; let the hub client try
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError as error:
        log.warning("Hugging Face hub %s unreachable: %s", endpoint, error)
        return False
