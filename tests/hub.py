"""A stand-in for the Hugging Face hub on loopback, serving the tiny checkpoints in the layout of
Kyutai's repos, so that `HF_ENDPOINT=<its url>` makes `--model kyutai/...` download exactly as on a
GPU box: through huggingface_hub's `hf_hub_download` and moshi's `CheckpointInfo.from_hf_repo`.

It speaks the part of the hub's file API that `hf_hub_download` uses: `HEAD` and `GET` of
`/{owner}/{name}/resolve/{revision}/{path}`, with the commit (`X-Repo-Commit`), the file's ETag
and size, ranges (`Range: bytes=N-`, for resuming), and the errors the client tells apart by
`X-Error-Code` (`RepoNotFound`, `GatedRepo`, `EntryNotFound`). It can cut a download off midway:
it promises the whole file and closes the connection after half of it.

- `kyutai/moshiko-pytorch-bf16`: the tiny checkpoint under Moshiko's file names (`model.safetensors`,
  `tokenizer-e351c8d8-checkpoint125.safetensors` for Mimi, `tokenizer_spm_32k_3.model`), with a
  `config.json` naming them (and the tiny Mimi's config, which Moshiko's repo does without).
- `kyutai/moshiko-pytorch-q8`: tiny-q8 as Kyutai's q8 repos are: `model.q8.safetensors` and a
  config that says `quantize` and names Mimi and the tokenizer in the bf16 repo (`hf://...`).
- `kyutai/moshiko-gated`: gated, as a repo is to a token without access.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from moshi_engine.model.checkpoint import TINY_DIR, TINY_Q8_DIR

BF16 = "kyutai/moshiko-pytorch-bf16"
Q8 = "kyutai/moshiko-pytorch-q8"
GATED = "kyutai/moshiko-gated"
MOSHI_NAME = "model.safetensors"
MIMI_NAME = "tokenizer-e351c8d8-checkpoint125.safetensors"
TOKENIZER_NAME = "tokenizer_spm_32k_3.model"
RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<path>.+)$")


def kyutai_repos() -> dict[str, dict[str, bytes]]:
    """Each repo's files: the tiny checkpoints under the names and layout of Kyutai's repos."""
    tiny = json.loads((TINY_DIR / "config.json").read_text())
    bf16_config = tiny | {"moshi_name": MOSHI_NAME, "mimi_name": MIMI_NAME, "tokenizer_name": TOKENIZER_NAME,
                          "mimi_config_name": "mimi_config.json"}
    q8 = json.loads((TINY_Q8_DIR / "config.json").read_text())
    q8_config = q8 | {"mimi_name": f"hf://{BF16}/{MIMI_NAME}", "tokenizer_name": f"hf://{BF16}/{TOKENIZER_NAME}",
                      "mimi_config_name": f"hf://{BF16}/mimi_config.json"}
    readme = b"# tiny Moshi, served by tests/hub.py\n"
    return {
        BF16: {
            "config.json": json.dumps(bf16_config, indent=2).encode(),
            MOSHI_NAME: (TINY_DIR / "model.safetensors").read_bytes(),
            MIMI_NAME: (TINY_DIR / "mimi.safetensors").read_bytes(),
            TOKENIZER_NAME: (TINY_DIR / "tokenizer.model").read_bytes(),
            "mimi_config.json": (TINY_DIR / "mimi_config.json").read_bytes(),
            "README.md": readme,
        },
        Q8: {
            "config.json": json.dumps(q8_config, indent=2).encode(),
            "model.q8.safetensors": (TINY_Q8_DIR / "model.q8.safetensors").read_bytes(),
            "README.md": readme,
        },
        GATED: {"config.json": b"{}"},
    }


@dataclass
class Request:
    method: str
    repo: str
    path: str
    start: int  # the first byte asked for (a resumed download asks for more than 0)


@dataclass
class HubStandIn:
    """The stand-in's state: what it serves, which downloads it cuts, and what it was asked."""

    repos: dict[str, dict[str, bytes]] = field(default_factory=kyutai_repos)
    gated: set[str] = field(default_factory=lambda: {GATED})
    cuts: dict[str, int] = field(default_factory=dict)  # file name -> GETs still to cut off midway
    requests: list[Request] = field(default_factory=list)
    url: str = ""

    def commit(self, repo: str) -> str:
        return hashlib.sha1(repo.encode()).hexdigest()  # noqa: S324 - a name, like git's

    def got(self, path: str) -> list[Request]:
        """The GETs of files named `path`, in order."""
        return [request for request in self.requests if request.method == "GET" and request.path == path]


@contextlib.contextmanager
def serve_hub(hub: HubStandIn | None = None):
    """Run a stand-in hub on a free loopback port until the block ends; yields it (its `url`
    is what HF_ENDPOINT takes)."""
    hub = hub or HubStandIn()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def do_HEAD(self) -> None:  # noqa: N802 - http.server's names
            self._answer(body=False)

        def do_GET(self) -> None:  # noqa: N802
            self._answer(body=True)

        def _error(self, status: int, code: str, message: str, repo: str | None = None) -> None:
            payload = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            if repo is not None:
                self.send_header("X-Repo-Commit", hub.commit(repo))
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(payload)

        def _answer(self, body: bool) -> None:
            match = RESOLVE.match(self.path.split("?")[0])
            if not match:
                return self._error(404, "RepoNotFound", "Repository Not Found")
            repo, path = match["repo"], match["path"]
            ranged = re.match(r"bytes=(\d+)-", self.headers.get("Range", ""))
            start = int(ranged[1]) if ranged else 0
            hub.requests.append(Request(self.command, repo, path, start))
            if repo not in hub.repos:
                return self._error(404, "RepoNotFound", f"Repository Not Found for url: {self.path}")
            if repo in hub.gated:
                return self._error(403, "GatedRepo", f"Access to model {repo} is restricted. You must have access "
                                                     "to it and be authenticated to access it. Please log in.")
            content = hub.repos[repo].get(path)
            if content is None:
                return self._error(404, "EntryNotFound", f"{path} does not exist", repo)
            etag = hashlib.sha256(content).hexdigest()
            self.send_response(206 if ranged and body else 200)
            self.send_header("X-Repo-Commit", hub.commit(repo))
            self.send_header("ETag", f'"{etag}"')
            self.send_header("X-Linked-Etag", f'"{etag}"')
            self.send_header("X-Linked-Size", str(len(content)))
            self.send_header("Accept-Ranges", "bytes")
            part = content[start:] if body else content
            if ranged and body:
                self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
            self.send_header("Content-Length", str(len(part)))
            self.end_headers()
            if not body:
                return
            if hub.cuts.get(path, 0) > 0:  # the whole file promised, half of it sent, and the line goes dead
                hub.cuts[path] -= 1
                self.wfile.write(part[: len(part) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(part)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="hub-stand-in", daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def cached_files(hf_home: Path, repo: str) -> dict[str, Path]:
    """The files of `repo` in the HF cache under `hf_home`, by name (those whole: in a snapshot)."""
    snapshots = hf_home / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots"
    return {path.name: path for path in snapshots.glob("*/*")} if snapshots.exists() else {}


def incomplete_files(hf_home: Path, repo: str) -> list[Path]:
    """Downloads of `repo` cut off midway, kept to be resumed."""
    return list((hf_home / "hub" / f"models--{repo.replace('/', '--')}" / "blobs").glob("*.incomplete"))
