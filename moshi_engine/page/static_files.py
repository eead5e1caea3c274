"""The browser-side client's files (`moshi_engine/page/static/`) and where an app serves them.

    app = create_api(engine)
    mount_static(app)          # before mount_ui: the page's "/" mount would catch the path
    # http://host/moshi-static/moshi-socket.js, .../ws-demo.html

`static/` holds plain ES modules, no build step: `ogg.js` (Ogg framing of Opus),
`opus.js` (WebCodecs or the vendored opus-recorder WASM), `audio.js` and
`worklets/` (microphone frames, the bounded player), `moshi-socket.js` (a
conversation over `/api/chat`), `ws-demo.html` (a harness page), and the voice chat
page's own script: `page.js` (WebRTC, or this websocket when WebRTC cannot connect;
`ui.mount_ui` mounts this directory itself), `webrtc-watch.js`, `page-words.js`,
`recording.js` and `readout.js` (how late Moshi's voice arrives, the time left). Vendored
libraries sit in `static/vendor/<name>/` with their licenses. Nothing is fetched
from elsewhere at run time, so the page works offline.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_PATH = "/moshi-static"

# Module scripts need a JavaScript type and WebAssembly streaming compilation a wasm
# one; some systems' MIME tables lack either.
mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("application/wasm", ".wasm")


def mount_static(app: FastAPI, path: str = STATIC_PATH) -> None:
    """Serve `static/` at `path` of `app`."""
    app.mount(path, StaticFiles(directory=STATIC_DIR), name="moshi-static")
