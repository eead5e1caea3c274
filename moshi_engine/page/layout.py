"""What the voice chat page shows: its words, styles and components, top to bottom, and the
status line and details it fills in (`ui.build_page` wires them to the conversations)."""

from __future__ import annotations

import html
from dataclasses import dataclass

import gradio as gr
from fastrtc import WebRTC

from ..conversation import Sampling
from ..timings import LM_STEP, MIMI_DECODE, MIMI_ENCODE
from .conversation_log import ConversationRecord
from .ice import server_rtc_configuration
from .pagescript import DETAILS_ID, DETAILS_SUMMARY, RECORDING_LINK

MODEL_CARD_URL = "https://huggingface.co/kyutai/moshiko-pytorch-bf16"

INTRO = f"""
# Talk with Moshi

Moshi is [Kyutai's full-duplex speech model]({MODEL_CARD_URL}): it listens and speaks at the same time,
so you can interrupt it and it can answer while you are still talking.
Press **Click to Access Microphone**, then **Talk to Moshi**, and speak: Moshi answers out loud and its words appear
below as it says them. Headphones keep Moshi from hearing itself. After a conversation you can download its recording.
"""

CSS = """
#moshi-resume { display: none !important; }
#moshi-status { font-size: 0.9em; opacity: 0.85; }
#moshi-message:not(:empty) { border-left: 4px solid var(--color-accent); padding-left: 0.75em; }
#moshi-transport .moshi-transport-status { font-size: 0.85em; opacity: 0.8; margin: 0; }
#moshi-transport .moshi-transport-message {
  border-left: 4px solid var(--color-accent); padding-left: 0.75em; margin: 0.5em 0 0;
}
#moshi-transport .moshi-transport-message:empty { display: none; }
#moshi-transport .moshi-transport-stop {
  display: inline-flex; align-items: center; gap: 0.5em; margin-top: 0.5em; padding: 0.4em 1.2em;
  border: 1px solid var(--border-color-primary); border-radius: 999px; cursor: pointer;
  background: var(--background-fill-primary); color: var(--body-text-color); font-weight: 600;
}
#moshi-transport .moshi-transport-stop::before {
  content: ""; width: 0.7em; height: 0.7em; border-radius: 2px; background: var(--color-accent);
}
#moshi-transport .moshi-transport-stop[hidden] { display: none; }
/* The live readout (static/readout.js): how late Moshi's voice arrives, and the time left. */
#moshi-transport .moshi-readout { font-size: 0.85em; margin: 0.4em 0 0; font-variant-numeric: tabular-nums; }
#moshi-transport .moshi-readout-left:not(:empty)::before { content: " · "; }
#moshi-transport .moshi-readout-warning {
  border-left: 4px solid var(--color-accent); padding-left: 0.75em; margin: 0.5em 0 0; font-weight: 600;
}
#moshi-transport [hidden] { display: none; }
#moshi-recording .moshi-details { font-size: 0.85em; opacity: 0.85; margin-top: 0.4em; }
/* The recording's block shows only when it holds a link (from either transport). */
#moshi-recording:not(:has(a)) { display: none; }
/* Why this page cannot have a microphone (page.js fills it): in view, and not a toast that fades. */
#moshi-microphone .moshi-microphone-problem {
  border-left: 4px solid var(--error-border-color, #dc2626); padding: 0.6em 0.9em; margin: 0;
  background: var(--error-background-fill, #fef2f2); color: var(--error-text-color, #b91c1c); font-weight: 500;
}
#moshi-microphone .moshi-microphone-problem:empty { display: none; }
/* ... and while that lasts, the buttons that would not work are not offered. */
body[data-moshi-microphone] #moshi-webrtc button { display: none !important; }
/* While a conversation goes over the websocket, FastRTC's Talk button would only start
   another one (and its device menu means nothing there): page.js shows its own Stop. */
body[data-moshi-transport="websocket"] #moshi-webrtc .button-wrap,
body[data-moshi-transport="websocket"] #moshi-webrtc button[aria-label="start stream"] { visibility: hidden; }
"""
# Filled by static/page.js when the page cannot have a microphone (endings.MICROPHONE_WORDS).
MICROPHONE_HTML = '<p class="moshi-microphone-problem" role="alert"></p>'
# Filled by static/page.js: which transport carries the conversation, the websocket
# path's messages (the WebRTC path's go to #moshi-message), and its Stop button.
TRANSPORT_HTML = """
<p class="moshi-transport-status" aria-live="polite"></p>
<p class="moshi-transport-message" aria-live="polite"></p>
<p class="moshi-readout" hidden><span class="moshi-readout-behind"></span>
<span class="moshi-readout-left"></span></p>
<p class="moshi-readout-warning" role="status" hidden></p>
<button class="moshi-transport-stop" type="button" hidden>Stop</button>
"""


def voice_status(status: dict | None, voice: str | None) -> dict | None:
    """The part of a /status-like dict about `voice` (its entry of `voices`), or the whole
    status when it lists no voices (one voice) or not that one."""
    for entry in (status or {}).get("voices") or ():
        if entry.get("name") == voice:
            return entry
    return status


def status_line(status: dict | None, remote: str | None = None, voice: str | None = None) -> str:
    """One line of Markdown from a /status-like dict: model, device, free slots, frame time;
    with a `voice` of several, that voice's."""
    status = voice_status(status, voice)
    if not status:
        return f"Moshi runs at `{remote}`." if remote else "Moshi's status is not available right now."
    if status.get("unavailable"):
        return f"Moshi is unavailable right now: {status['unavailable']}."
    parts = [f"Voice **{voice}**: model `{status.get('model', '?')}`" if voice and status.get("name") == voice
             else f"Model `{status.get('model', '?')}`"]
    if "device" in status:
        precision = status.get("dtype")
        if precision and status.get("weights") and status["weights"] != precision:
            precision += f", {status['weights']} weights"
        parts.append(f"on {status['device']}" + (f" ({precision})" if precision else ""))
    sessions = status.get("sessions") or {}
    if "capacity" in sessions:
        capacity = sessions["capacity"]
        free = max(0, capacity - sessions.get("active", 0))
        parts.append(f"**{free} of {capacity}** conversation slot{'s' if capacity != 1 else ''} free")
    waiting = (status.get("queue") or {}).get("waiting", 0)
    if waiting:
        parts.append(f"{waiting} waiting in line")
    frame_ms = median_frame_ms(status.get("timings") or {})
    if frame_ms is not None:
        verdict = "real time" if frame_ms < 80 else "slower than real time"
        parts.append(f"frame time {frame_ms:.1f} ms of 80 ms ({verdict})")
    return " · ".join(parts)


def median_frame_ms(timings: dict) -> float | None:
    """Median compute per 80 ms frame: Mimi encode + LM step + Mimi decode (None before any)."""
    stages = [timings.get(stage) or {} for stage in (MIMI_ENCODE, LM_STEP, MIMI_DECODE)]
    if not all(stage.get("count") for stage in stages):
        return None
    return sum(stage["p50_ms"] for stage in stages)


def free_slots(status: dict | None) -> int | None:
    sessions = (status or {}).get("sessions") or {}
    if "capacity" not in sessions:
        return None
    return max(0, sessions["capacity"] - sessions.get("active", 0))


@dataclass
class Layout:
    """The page's components that its events read or write."""

    status: gr.Markdown
    voice: gr.Radio
    webrtc: WebRTC
    message: gr.Markdown
    transcript: gr.Textbox
    recording: gr.HTML
    controls: list[gr.components.Component]
    resume: gr.Textbox


def layout(voices: list[str] | None, remote: str | None, host: str, rtc_configuration,
            default_sampling: Sampling) -> Layout:
    """What the page shows, top to bottom (inside its Blocks): the introduction, the status line,
    the voice picker (shown with two voices or more), the conversation (the microphone's problem,
    FastRTC's component, the transport's line and live readout, the message, the transcript,
    the recording) and the sampling controls beside it."""
    picking = len(voices or ()) > 1
    gr.Markdown(INTRO)
    status_md = gr.Markdown(status_line(None, remote), elem_id="moshi-status")
    # page.js reads the voice picked for a conversation over the websocket
    voice = gr.Radio(voices or [], value=(voices or [None])[0], label="Voice", visible=picking,
                     elem_id="moshi-voice", info="Each voice is a Moshi of its own, with its own free slots.")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            gr.HTML(MICROPHONE_HTML, elem_id="moshi-microphone")
            webrtc = WebRTC(
                label="Conversation",
                modality="audio",
                mode="send-receive",
                variant="wave",
                full_screen=False,
                rtc_configuration=rtc_configuration,
                server_rtc_configuration=server_rtc_configuration(host),
                button_labels={"start": "Talk to Moshi", "stop": "Stop", "waiting": "Connecting"},
                elem_id="moshi-webrtc",
            )
            gr.HTML(TRANSPORT_HTML, elem_id="moshi-transport")
            message_md = gr.Markdown(elem_id="moshi-message")
            transcript = gr.Textbox(
                label="What Moshi says",
                lines=6,
                max_lines=12,
                interactive=False,
                autoscroll=True,
                elem_id="moshi-transcript",
            )
            # A plain link, so that the browser fetches the file itself, with its identity
            # cookie: the recording is this browser's alone (`conversation_log`). Always in the page
            # (CSS hides it while empty): page.js puts the websocket path's link here too.
            recording = gr.HTML("", elem_id="moshi-recording")
            # Never shown: page.js puts a conversation's resume token here before it takes that
            # conversation up on a new WebRTC connection (a handover), and empties it after.
            resume = gr.Textbox("", show_label=False, container=False, elem_id="moshi-resume")
        with gr.Column(scale=2):
            controls = sampling_controls(default_sampling)
    return Layout(status_md, voice, webrtc, message_md, transcript, recording, controls, resume)


def sampling_controls(d: Sampling) -> list[gr.components.Component]:
    """The sampling controls, in `sampling_from_inputs`' order, starting at `d`."""
    with gr.Accordion("Sampling, applied when a conversation starts", open=True):
        # elem_ids: page.js reads these for a conversation over the websocket
        return [
            gr.Slider(0.0, 2.0, value=d.temp, step=0.05, label="Audio temperature", elem_id="moshi-temp"),
            gr.Slider(1, max(500, d.top_k), value=d.top_k, step=1, label="Audio top-k", elem_id="moshi-top-k"),
            gr.Slider(0.0, 2.0, value=d.temp_text, step=0.05, label="Text temperature", elem_id="moshi-temp-text"),
            gr.Slider(1, max(100, d.top_k_text), value=d.top_k_text, step=1, label="Text top-k",
                      elem_id="moshi-top-k-text"),
            gr.Number(value=-1 if d.seed is None else d.seed, precision=0, minimum=-1, label="Seed (-1: random)",
                      elem_id="moshi-seed"),
        ]


def download_link(record: ConversationRecord) -> str:
    name = html.escape(record.recording.name)
    link = f'<a href="recordings/{record.download_id}" download="{name}">{html.escape(RECORDING_LINK)}</a>'
    return link + details_html(record.conversation_id)


def details_html(conversation_id: str) -> str:
    """The conversation's details under its recording: its id, as in the server's log and the
    recording's name (static/page.js writes the same for the websocket path)."""
    words = html.escape(DETAILS_ID).replace("{id}", f"<code>{html.escape(conversation_id)}</code>")
    return f'<details class="moshi-details"><summary>{html.escape(DETAILS_SUMMARY)}</summary><p>{words}</p></details>'
