"""The page's own script (`static/page.js`) and what Python hands it.

The Gradio page talks over WebRTC (FastRTC) first. `page.js` watches that attempt and,
when WebRTC cannot connect, carries the conversation over this server's `/api/chat`
websocket instead (`static/moshi-socket.js`); `?transport=webrtc|websocket` forces
either. It needs a few facts only Python knows, and the sentences the page shows: they
come from `endings.page_words`, rendered into the page's head as a JSON block, so that
no sentence is typed twice.

    head = page_head(limits, line_timeout_s=120, places=8, chat_path="/api/chat")
    gr.Blocks(head=head)   # after static_files.mount_static(app): the module is served from there
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from ..conversation import SessionLimits
from ..wire.protocol import idle_reason, lost_reason, time_limit_reason
from .endings import page_words
from .event_stream import TAKE_OVER
from .static_files import STATIC_PATH

CONFIG_ID = "moshi-page-config"
# How long WebRTC may take to connect before the page talks over its websocket instead,
# counted from the server's answer to the offer (or from pressing Talk, if no answer comes).
# On a network where WebRTC works, ICE connects within a second or two, TURN included
# (a relay allocation is one more round trip); where no candidate pair can ever work
# (a strict NAT, no TURN), Chromium stays "checking" with no end, so waiting longer buys
# nothing. 5 s is several times the slow legitimate case and short enough to be only a
# pause for the person who pressed Talk. `?webrtc_timeout=seconds` overrides it.
WEBRTC_TIMEOUT_S = 5.0
RECORDING_READY = " Its recording is ready to download below."
RECORDING_LINK = "Download the conversation (WAV: you left, Moshi right)"
DETAILS_SUMMARY = "Details"
DETAILS_ID = "Conversation {id}: the id in the server's log and in the recording's name."


def page_config(
    limits: SessionLimits,
    *,
    line_timeout_s: float,
    places: int,
    chat_path: str | None,
    webrtc_routes: Mapping[str, str],
) -> dict:
    """What `page.js` reads: where its websocket is (`chat`; None when this app has no
    `/api/chat`, e.g. a page in front of a remote Moshi), where to tell the server that an
    unconnected WebRTC attempt is abandoned, the fallback's timeout, the close reasons it
    must recognise, and the page's sentences."""
    return {
        "chat": chat_path,
        **webrtc_routes,  # abandon, resume, stop (ui.WEBRTC_ROUTES)
        "takeOver": TAKE_OVER,  # in the query of Gradio's event stream moved after a handover
        "webrtcTimeoutS": WEBRTC_TIMEOUT_S,
        "sessionLimitS": limits.max_session_s,  # the readout counts down to it
        "reconnectGraceS": limits.reconnect_grace_s,  # how long a lost WebRTC connection may come back
        "reasons": {
            "timeLimit": time_limit_reason(limits.max_session_s),
            "idle": idle_reason(limits.idle_s),
            "lost": lost_reason(limits.reconnect_grace_s),
        },
        "words": {
            **page_words(limits, line_timeout_s, places),
            "recordingReady": RECORDING_READY,
            "recordingLink": RECORDING_LINK,
            "detailsSummary": DETAILS_SUMMARY,
            "detailsId": DETAILS_ID,
        },
    }


def page_head(config: dict, static_path: str = STATIC_PATH) -> str:
    """The `<head>` HTML of the page: the config as JSON, and `page.js` as a module."""
    # "</" could end the script element early; JSON allows "<\/" for it.
    data = json.dumps(config, ensure_ascii=False).replace("</", "<\\/")
    return (
        f'<script type="application/json" id="{CONFIG_ID}">{data}</script>\n'
        f'<script type="module" src="{static_path}/page.js"></script>'
    )
