"""How a conversation on the page ends, and the one sentence the person is told.

Every transport that serves the page (WebRTC, and the page's own websocket path)
ends a conversation in one of these ways, and says so in these words: the page's
script gets them from `page_words` rather than a copy.
"""

from __future__ import annotations

import enum

from ..conversation import BusyError, ServerRestarting, SessionClosed, SessionLimits
from ..door.line import LinePosition, LineTimeout


class Ending(enum.Enum):
    STOPPED = "stopped"  # the person pressed stop or closed the tab (also while in line)
    BUSY = "busy"  # no conversation slot was free and no place in the line either
    LINE_TIMEOUT = "line_timeout"  # waited in line as long as one may, and no slot freed up
    TIME_LIMIT = "time_limit"
    IDLE = "idle"  # no microphone audio for a while: the connection is gone or the mic is off
    RESTART = "restart"  # the server is restarting
    LOST = "lost"  # the connection broke and did not come back within the reconnect grace
    ERROR = "error"


def ending_message(ending: Ending, limits: SessionLimits = SessionLimits(), detail: str = "") -> str:
    """The one sentence the page shows for an ending; says what happened and what to do."""
    if ending is Ending.BUSY:
        return (
            "Moshi is busy: every conversation slot is taken and the waiting line is full. "
            "Please try again in a few minutes; the status line above shows when a slot is free."
        )
    if ending is Ending.LINE_TIMEOUT:
        return (
            f"You waited {detail or 'as long as one may'} in line and no conversation slot freed up. "
            "Please try again in a few minutes."
        )
    if ending is Ending.RESTART:
        return "The server is restarting. Press the button to talk again in a minute."
    if ending is Ending.TIME_LIMIT:
        return (
            f"Time is up: a conversation lasts at most {duration_words(limits.max_session_s)}. "
            "Press the button to start a new one."
        )
    if ending is Ending.IDLE:
        return (
            f"The conversation ended because no microphone audio arrived for {duration_words(limits.idle_s)}. "
            "Check your microphone and connection, then press the button again."
        )
    if ending is Ending.LOST:
        return (
            f"The connection to Moshi was lost for {duration_words(limits.reconnect_grace_s)}, so the conversation "
            "ended and its slot went to the next visitor. Press the button to start a new one."
        )
    if ending is Ending.ERROR:
        return f"Something went wrong ({detail or 'unknown error'}). Press the button to try again."
    return f"Conversation ended after {detail}." if detail else "Conversation ended."


# The live readout during a conversation (the page's script fills them): how far behind real
# time Moshi's voice arrives as the browser sees it, and the time left before the session limit.
READOUT_WORDS = {
    "behind": "Moshi's voice arrives {ms} ms behind",
    "behindWebrtc": "Moshi's voice arrives {ms} ms behind (jitter buffer {jitter} ms, round trip {rtt} ms)",
    "behindWebsocket": "Moshi's voice arrives {ms} ms behind (queued in the player)",
    "left": "{time} left",
    "reconnecting": "Reconnecting…",
    "lastMinute": (
        "Less than a minute left: the conversation ends at the {limit} limit. "
        "Press the button afterwards to start a new one."
    ),
}

# While a broken connection is being taken up again (the countdown keeps going meanwhile).
RECONNECTING_MESSAGE = (
    "The connection to Moshi was lost: reconnecting. The conversation keeps its place for {grace}."
)

LEFT_LINE_MESSAGE = "You left the line. Press the button to wait for a conversation again."
STARTING_MESSAGE = "Connecting to Moshi: its server may be starting up, which can take a minute or two."


# The line's sentence and its parts, as templates: `line_message` fills them here, and the
# page's own script fills the same ones (`page_words`), so the words live in this file alone.
LINE_MESSAGE = (
    "Every conversation slot is taken: you are {place} in line, {wait}. "
    "Your conversation starts by itself when a slot frees up; Stop leaves the line."
)
WAIT_SOON = "less than a minute"
WAIT_ABOUT = "about {minutes}"
MINUTE = "{n} minute"
MINUTES = "{n} minutes"
SECONDS = "{n} s"


# The microphone. A page opened over plain http from another machine is not a secure
# context, and browsers then give it no microphone at all (nor the websocket path's audio
# worklets): the page says so as soon as it loads, and the server's log at start.
# `{host}` and `{port}` are the server's as the browser reached it; `code` is set off in
# backticks, which the page shows as code.
WAYS_OUT = (
    "start the server with `--https` (the browser asks once to accept its certificate), or with `--share` "
    "for a public https link, or tunnel it over SSH: run `ssh -L {port}:localhost:{port} {host}` "
    "on your computer and open `http://localhost:{port}`"
)
MICROPHONE_WORDS = {
    "insecure": (
        "This page cannot use your microphone: it was opened over plain http from another machine, and "
        "browsers give a microphone only to https pages and to `http://localhost`. To talk, "
        + WAYS_OUT + "."
    ),
    "denied": (
        "This page may not use your microphone: it is blocked for this site. Allow it in the browser's "
        "site settings (the icon at the left of the address bar), then reload the page."
    ),
    "dismissed": "The browser did not give this page your microphone. Press the button again and allow it.",
    "missing": (
        "No microphone was found. Connect one (or let the browser see it in the system's settings): "
        "the button to talk comes back as soon as there is one."
    ),
    "unreadable": (
        "Your microphone could not be opened: another application may be using it. "
        "Close that application and press the button again."
    ),
}


def remote_http_warning(host: str, port: int) -> str:
    """What the server's log says at start when browsers on other machines would reach it over
    plain http, and so get no microphone."""
    return (
        f"browsers on other machines get no microphone from http://{host}:{port} (only https pages and "
        f"http://localhost may use one). To talk from another machine, "
        + WAYS_OUT.format(host="<this machine>", port=port) + "."
    )


def line_message(position: LinePosition) -> str:
    """What a visitor waiting for a slot is told, updated as the line moves."""
    if position.eta_s < 60:
        wait = WAIT_SOON
    else:
        wait = WAIT_ABOUT.format(minutes=minutes_words(round(position.eta_s / 60)))
    return LINE_MESSAGE.format(place=ordinal(position.position), wait=wait)


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def ending_for(error: BaseException) -> tuple[Ending, str]:
    """The ending an error from a backend (local or remote) means, and its detail."""
    if isinstance(error, LineTimeout):
        return Ending.LINE_TIMEOUT, duration_words(error.timeout_s)
    if isinstance(error, BusyError):
        return Ending.BUSY, str(error)
    if isinstance(error, ServerRestarting):
        return Ending.RESTART, str(error)
    if isinstance(error, SessionClosed):  # a remote server ended the session
        return Ending.ERROR, str(error) or "the conversation closed unexpectedly"
    return Ending.ERROR, str(error) or type(error).__name__


def duration_words(seconds: float) -> str:
    if seconds >= 60 and seconds % 60 == 0:
        return minutes_words(int(seconds // 60))
    return SECONDS.format(n=f"{seconds:g}")


def minutes_words(n: int) -> str:
    return (MINUTE if n == 1 else MINUTES).format(n=n)


def page_words(limits: SessionLimits, line_timeout_s: float, places: int) -> dict:
    """The sentences above as the page's own script needs them (static/page-words.js fills the
    same templates): its websocket path tells each ending and the line's place in these words.

    Fixed sentences come rendered for these limits; `{detail}`, `{place}`, `{wait}`,
    `{minutes}`, `{n}`, and the microphone's `{host}` and `{port}` are left for the page to
    fill; `ordinals` covers every place in line.
    """
    return {
        "endings": {
            "stopped": ending_message(Ending.STOPPED, limits),
            "stoppedAfter": ending_message(Ending.STOPPED, limits, "{detail}"),
            "busy": ending_message(Ending.BUSY, limits),
            "lineTimeout": ending_message(Ending.LINE_TIMEOUT, limits, duration_words(line_timeout_s)),
            "timeLimit": ending_message(Ending.TIME_LIMIT, limits),
            "idle": ending_message(Ending.IDLE, limits),
            "restart": ending_message(Ending.RESTART, limits),
            "lost": ending_message(Ending.LOST, limits),
            "error": ending_message(Ending.ERROR, limits, "{detail}"),
        },
        "leftLine": LEFT_LINE_MESSAGE,
        "reconnecting": RECONNECTING_MESSAGE.format(grace=duration_words(limits.reconnect_grace_s)),
        "line": LINE_MESSAGE,
        "waitSoon": WAIT_SOON,
        "waitAbout": WAIT_ABOUT,
        "minute": MINUTE,
        "minutes": MINUTES,
        "seconds": SECONDS,
        "ordinals": [ordinal(n) for n in range(1, places + 1)],
        "microphone": MICROPHONE_WORDS,
        "readout": {**READOUT_WORDS, "lastMinute": READOUT_WORDS["lastMinute"].replace(
            "{limit}", duration_words(limits.max_session_s))},
    }
