"""Where a model comes from: a Hugging Face repo, a local checkpoint directory, or `tiny`.

Everything resolves to moshi's own `CheckpointInfo`, so the real loaders
(`get_mimi`, `get_moshi`, `get_text_tokenizer`, `lm_gen_config`) build the models
whatever the source. A local directory uses the layout of Kyutai's newer repos:
`config.json` (LM kwargs plus `moshi_name`, `mimi_name`, `tokenizer_name`,
optionally `mimi_config_name` and `lm_gen_config`) beside the files it names.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from moshi.models import loaders

log = logging.getLogger(__name__)

DEFAULT_MODEL = loaders.DEFAULT_REPO  # kyutai/moshiko-pytorch-bf16
TINY = "tiny"
TINY_Q8 = "tiny-q8"  # the tiny checkpoint quantized to 8 bits as Kyutai's q8 repos are (`quantize`)
RANDOM = "random"  # the full-size Moshiko architecture with random weights: no download
ASSETS_DIR = Path(__file__).resolve().parents[2] / "assets"
TINY_DIR = ASSETS_DIR / "tiny-moshi"
TINY_Q8_DIR = ASSETS_DIR / "tiny-moshi-q8"
CONFIG_NAME = "config.json"
_OFFLINE_HINT = f"For an offline demo use the bundled random checkpoint: --model {TINY}."


class ModelUnavailableError(RuntimeError):
    """The model spec names nothing that can be loaded from here."""


def resolve_checkpoint(spec: str) -> loaders.CheckpointInfo:
    """Turn a model spec into a CheckpointInfo, downloading (with progress bars) if needed.

    `spec` is `tiny`, `tiny-q8`, `random`, a local checkpoint directory, or a Hugging Face
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
    path = Path(spec).expanduser()
    if path.is_dir():
        return checkpoint_from_directory(path)
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModelUnavailableError(
            f"model {spec!r} is neither a checkpoint directory nor a Hugging Face repo id "
            f"(owner/name, e.g. {DEFAULT_MODEL}). {_OFFLINE_HINT}"
        )
    return checkpoint_from_hub(spec)


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
    """Download (or reuse from the HF cache) a Kyutai repo through moshi's CheckpointInfo."""
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
    from requests.exceptions import ConnectionError, Timeout

    if not constants.HF_HUB_OFFLINE and not _hub_reachable(constants.ENDPOINT):
        # Without this check the hub client retries for ~20 s per file before failing.
        raise ModelUnavailableError(
            f"cannot reach the Hugging Face hub ({constants.ENDPOINT}) to fetch {repo}. "
            f"If its files are already in the HF cache, set HF_HUB_OFFLINE=1. {_OFFLINE_HINT}"
        )
    try:
        return loaders.CheckpointInfo.from_hf_repo(repo)
    except (GatedRepoError, RepositoryNotFoundError) as error:
        raise ModelUnavailableError(
            f"{repo} is not a public Hugging Face repo, or is gated: check the name, "
            f"or set HF_TOKEN to a token that can read it. {_OFFLINE_HINT}"
        ) from error
    except (LocalEntryNotFoundError, ConnectionError, Timeout) as error:
        raise ModelUnavailableError(
            f"could not download {repo} from the Hugging Face hub and it is not in the "
            f"HF cache ({constants.HF_HUB_CACHE}): {error}. {_OFFLINE_HINT}"
        ) from error


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
