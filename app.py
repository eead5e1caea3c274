# ---
# cmd: ["modal", "serve", "app.py"]
# ---

# # Talk with Moshi: a full-duplex voice chat on Modal, Hugging Face Spaces, or your own machine

# [Moshi](https://huggingface.co/kyutai/moshiko-pytorch-bf16) is Kyutai's speech-to-speech model:
# it listens and speaks at the same time, with about 200 ms between your words and its answer
# on a good GPU. This file deploys it as a voice chat page: a Gradio app whose FastRTC (WebRTC)
# audio component streams your microphone to Moshi and streams its voice back, next to the Opus
# websockets `/ws` (QuiLLMan's protocol) and `/api/chat` (moshi's own). One copy of the weights
# serves many conversations at once: each is a slot, a row of one batched Moshi with its own
# streaming state, that nobody else's conversation touches. One GPU can serve both of Kyutai's
# voices, Moshiko and Moshika, side by side: `MOSHI_MODEL=kyutai/moshiko-pytorch-bf16,kyutai/moshika-pytorch-bf16`,
# and the visitor picks one.

# Everything it wires lives in `moshi_engine/`; this file only tells the deployment story.
#
# - `modal serve app.py` / `modal deploy app.py`: a GPU container on Modal.
# - `python app.py`: the same app on your machine or as a Hugging Face Space.

import argparse
import logging
import os
import sys
from pathlib import Path

import modal

from moshi_engine.model.sizing import (
    AUTO,
    MAX_AUTO_SESSIONS,
    MOSHI_7B_CONTEXT,
    container_size,
    estimate_sessions,
    explicit_sessions,
    one_process_conversations,
)
from moshi_engine.model.voices import parse_voices

# ## Configuration

# These are read when Modal builds and deploys the app (`MOSHI_GPU=H100 modal deploy app.py`),
# and copied into the image so that the containers see the same values.

CONFIG = {
    "MOSHI_MODEL": os.environ.get("MOSHI_MODEL", "kyutai/moshiko-pytorch-bf16"),
    "MOSHI_GPU": os.environ.get("MOSHI_GPU", "L40S"),
    "MOSHI_SESSIONS": os.environ.get("MOSHI_SESSIONS", AUTO),
    "MOSHI_CONTEXT": os.environ.get("MOSHI_CONTEXT", ""),
    "MOSHI_QUEUE": os.environ.get("MOSHI_QUEUE", "8"),
    "MOSHI_QUEUE_TIMEOUT_S": os.environ.get("MOSHI_QUEUE_TIMEOUT_S", "120"),
    "MOSHI_SESSION_LIMIT_S": os.environ.get("MOSHI_SESSION_LIMIT_S", "600"),
    "MOSHI_IDLE_LIMIT_S": os.environ.get("MOSHI_IDLE_LIMIT_S", "30"),
    "MOSHI_RECONNECT_GRACE_S": os.environ.get("MOSHI_RECONNECT_GRACE_S", "15"),
    "MOSHI_SCALE_OUT": os.environ.get("MOSHI_SCALE_OUT", "0"),
    "MOSHI_MAX_WORKERS": os.environ.get("MOSHI_MAX_WORKERS", "10"),
    "MOSHI_MIN_WORKERS": os.environ.get("MOSHI_MIN_WORKERS", "0"),
    "MOSHI_MODAL_SECRET": os.environ.get("MOSHI_MODAL_SECRET", ""),
    "MOSHI_LOG_FORMAT": os.environ.get("MOSHI_LOG_FORMAT", "text"),  # or json, for a log collector
}
MODEL = CONFIG["MOSHI_MODEL"]  # one model, or a comma-separated list: one voice each
VOICES = parse_voices(MODEL)
GPU = CONFIG["MOSHI_GPU"]
SESSIONS = CONFIG["MOSHI_SESSIONS"]  # conversation slots per voice on a GPU: a number, or auto
CONTEXT = int(CONFIG["MOSHI_CONTEXT"]) if CONFIG["MOSHI_CONTEXT"] else None  # the LM's window, in 80 ms steps
QUEUE = int(CONFIG["MOSHI_QUEUE"])  # places in the waiting line for a slot
QUEUE_TIMEOUT_S = float(CONFIG["MOSHI_QUEUE_TIMEOUT_S"])
SESSION_LIMIT_S = int(CONFIG["MOSHI_SESSION_LIMIT_S"])
IDLE_LIMIT_S = int(CONFIG["MOSHI_IDLE_LIMIT_S"])
RECONNECT_GRACE_S = float(CONFIG["MOSHI_RECONNECT_GRACE_S"])  # a lost connection keeps its slot this long
SCALE_OUT = CONFIG["MOSHI_SCALE_OUT"].lower() in ("1", "true", "yes")
MAX_WORKERS = int(CONFIG["MOSHI_MAX_WORKERS"])
MIN_WORKERS = int(CONFIG["MOSHI_MIN_WORKERS"])

MINUTES = 60  # seconds
HERE = Path(__file__).parent

# ## How many conversations one GPU holds

# Each conversation slot keeps its own KV cache (1.6 GB for Moshi's 3000-step context, in
# proportion for a shorter `MOSHI_CONTEXT`) next to the one copy of the weights (15.4 GB in
# bf16, 8.0 GB for Kyutai's 8-bit `-q8` repos), one copy per voice. With `MOSHI_SESSIONS=auto`
# the engine measures free memory at start and takes as many slots as fit, up to 32 a voice;
# two voices share what their weights leave. Modal must know the number before any GPU starts
# (to size each container's concurrency), so here it is estimated the same way from the GPU's
# memory, each voice's precision and the context (`moshi_engine.model.sizing`); set
# MOSHI_SESSIONS to a number to override.

GPU_MEMORY_GB = {"T4": 16, "L4": 24, "A10G": 24, "A100": 40, "A100-40GB": 40, "L40S": 48,
                 "A100-80GB": 80, "H100": 80, "H200": 141, "B200": 180}
# Kyutai names its 8-bit repos so (kyutai/moshiko-pytorch-q8)
QUANTIZED = [voice.model.endswith("-q8") for voice in VOICES]


def slots_per_voice() -> int:
    """Conversation slots of each voice in a GPU container: MOSHI_SESSIONS, or auto's estimate
    for MOSHI_GPU with every voice's weights on it."""
    if SESSIONS != AUTO:
        return explicit_sessions(SESSIONS)
    memory_gb = GPU_MEMORY_GB.get(GPU.split(":")[0].upper())
    if memory_gb is None:
        return MAX_AUTO_SESSIONS  # an unknown GPU: the engine's own auto still decides
    return estimate_sessions(memory_gb * 10**9, QUANTIZED, CONTEXT or MOSHI_7B_CONTEXT)


SLOTS = slots_per_voice()
SLOTS_PER_GPU = SLOTS * len(VOICES)
# Besides its audio, a browser conversation holds a few long requests open (Gradio's event
# stream, the transcript stream); the page's assets and status polls need room too.
REQUESTS_PER_CONVERSATION = 3
PAGE_REQUESTS = 100

# ## The CPU and memory beside the GPU

# Modal reserves only 0.125 of a core and 128 MiB for a container unless told. Each conversation
# costs the web server a measured share of a core and some memory (WebRTC or the websocket, Opus
# both ways, the loops), and each voice's model process a core and its host memory: reserve them
# for the slots the container serves (`moshi_engine.model.sizing.container_size`; the figures in
# README's Modal section).

GPU_CONTAINER = container_size(SLOTS_PER_GPU, voices=len(VOICES), transport="webrtc")

# ## The container image

# The image installs exactly what a Space installs, `requirements.txt`, then adds the engine
# package and its assets. Weights are not baked in: they live in a Volume (below).

image = (
    modal.Image.debian_slim(python_version="3.11")
    .pip_install_from_requirements(str(HERE / "requirements.txt"))
    .env(CONFIG | {"HF_HOME": "/cache/huggingface", "HF_XET_HIGH_PERFORMANCE": "1"})
    .add_local_dir(HERE / "assets", "/root/assets")
    # The whole package: its Python and the page's JavaScript, worklets and vendored Opus codec
    # (by default Modal would add only the .py files).
    .add_local_python_source("moshi_engine", ignore=["**/__pycache__/**"])
)

app = modal.App("moshi-voice-chat", image=image)

# ## Weights in a Volume, secrets optional

# Moshi's 7B weights (about 15 GB in bf16, for each voice) download from Hugging Face on the first
# start and are kept in a Volume mounted as the Hugging Face cache, so later cold starts read them
# from there.

hf_cache = modal.Volume.from_name("moshi-hf-cache", create_if_missing=True)
VOLUMES = {"/cache": hf_cache}

# A Modal Secret can carry HF_TOKEN (gated repos, and fastrtc's Cloudflare TURN credentials),
# other TURN credentials (see README), MOSHI_METRICS_TOKEN (for /metrics), and MOSHI_ACCESS_TOKEN,
# which makes the deployment private:
# `modal secret create moshi-secrets HF_TOKEN=... MOSHI_ACCESS_TOKEN=...`, then deploy with
# `MOSHI_MODAL_SECRET=moshi-secrets`. Secrets reach the containers, never the image.

SECRETS = [modal.Secret.from_name(CONFIG["MOSHI_MODAL_SECRET"])] if CONFIG["MOSHI_MODAL_SECRET"] else []

# Each websocket or WebRTC conversation is one long request; let it outlive the session limit.
REQUEST_TIMEOUT_S = SESSION_LIMIT_S + 5 * MINUTES


def load_warm_voices():
    """Download (first start only) and load every voice's Moshi, then step each a few frames so
    that CUDA graphs and kernels are ready before the first person speaks.

    If a voice's model process dies, its engine starts another; if none will start (a GPU gone
    bad), this container stops taking inputs and exits once the live ones end, and Modal
    starts the next conversation's container on another GPU."""
    import modal.experimental

    from moshi_engine.engine import load_voices
    from moshi_engine.watch.logs import configure_logging

    configure_logging(CONFIG["MOSHI_LOG_FORMAT"])  # every line about a conversation carries its id

    voices = load_voices(MODEL, sessions=SESSIONS if not SCALE_OUT else SLOTS, queue=QUEUE,
                         queue_timeout_s=QUEUE_TIMEOUT_S, context=CONTEXT)
    for engine in voices:
        engine.on_model_lost = lambda reason: modal.experimental.stop_fetching_inputs()
    hf_cache.commit()  # persist a fresh download for the next container
    return voices


def access_token():
    """The deployment's access token, from its Secret (None: public)."""
    return os.environ.get("MOSHI_ACCESS_TOKEN") or None


def metrics_token():
    """The token Prometheus sends for `/metrics`, from the Secret (None: open like /status)."""
    return os.environ.get("MOSHI_METRICS_TOKEN") or None


def session_limits():
    from moshi_engine.conversation import SessionLimits

    return SessionLimits(max_session_s=SESSION_LIMIT_S, idle_s=IDLE_LIMIT_S, reconnect_grace_s=RECONNECT_GRACE_S)


# ## One GPU serves the page and its conversations

# By default one container holds everything: Gradio keeps session state in the process and needs
# sticky sessions, hence `max_containers=1`, as in Modal's Gradio and FastRTC examples. Its
# concurrency admits every conversation its slots can hold plus the page's own requests (assets,
# event streams, status polls); conversations are limited to the engine's slots by the app itself.

if not SCALE_OUT:

    @app.cls(
        gpu=GPU,
        cpu=GPU_CONTAINER.cores,
        memory=GPU_CONTAINER.memory_mib,
        volumes=VOLUMES,
        secrets=SECRETS,
        max_containers=1,
        scaledown_window=5 * MINUTES,
        timeout=REQUEST_TIMEOUT_S,
    )
    @modal.concurrent(max_inputs=PAGE_REQUESTS + REQUESTS_PER_CONVERSATION * SLOTS_PER_GPU)
    class Moshi:
        @modal.enter()
        def load(self):
            self.voices = load_warm_voices()

        @modal.asgi_app()
        def web(self):
            from moshi_engine.web import create_app

            self.app = create_app(self.voices, limits=session_limits(), host="modal.run", token=access_token(),
                                  metrics_token=metrics_token())
            return self.app

        # A scale-down or a redeploy: tell every conversation (and everyone in line) why it ends.
        @modal.exit()
        def drain(self):
            from moshi_engine.web import drain_from_thread

            if hasattr(self, "app"):
                drain_from_thread(self.app)


# ## Scale-out: GPU workers of N conversations each

# With `MOSHI_SCALE_OUT=1` the page runs in one sticky CPU container, and every browser session
# is carried to a container of a GPU worker class, which serves as many conversations as it has
# slots (`max_inputs`): Modal routes a new conversation to a worker with a free slot and
# starts another GPU only when every worker is full, up to `MOSHI_MAX_WORKERS`; workers stay warm
# five minutes after use (and `MOSHI_MIN_WORKERS` always). Every worker loads every voice, and the
# page's `?voice=` rides on to it. Audio travels between them as Opus over the worker's
# `/api/chat` websocket. A cold worker takes a minute or two; the page says so.
#
# Prometheus scrapes the page: a worker's own `/metrics` reaches whichever worker Modal routes
# to, and a scrape is a request that keeps it (and its GPU) up. So each worker writes its figures
# into a Dict every 15 s while it runs, and the page's `/metrics` serves them beside its own, each
# worker's with a `worker` label (its container's id).

if SCALE_OUT:
    worker_figures = modal.Dict.from_name("moshi-worker-metrics", create_if_missing=True)
    # A worker serves the page's relays over /api/chat. The page carries every call and relays it
    # on, all in one process, which has one core's worth of them in it (about 21, measured on CPU):
    # more workers than fill that add GPUs the page cannot feed.
    WORKER = container_size(SLOTS_PER_GPU, voices=len(VOICES), transport="websocket")
    PAGE_CALLS = one_process_conversations("webrtc", relayed=True)
    PAGE = container_size(min(SLOTS_PER_GPU * MAX_WORKERS, PAGE_CALLS), voices=0, transport="webrtc", relayed=True)
    if modal.is_local() and SLOTS_PER_GPU * MAX_WORKERS > PAGE_CALLS:
        logging.getLogger("app").warning(
            "%d workers of %d slots are %d conversations; the page's one process carries about %d at once",
            MAX_WORKERS, SLOTS_PER_GPU, SLOTS_PER_GPU * MAX_WORKERS, PAGE_CALLS)

    @app.cls(
        gpu=GPU,
        cpu=WORKER.cores,
        memory=WORKER.memory_mib,
        volumes=VOLUMES,
        secrets=SECRETS,
        max_containers=MAX_WORKERS,
        min_containers=MIN_WORKERS,
        scaledown_window=5 * MINUTES,
        timeout=REQUEST_TIMEOUT_S,
    )
    @modal.concurrent(max_inputs=SLOTS_PER_GPU)
    class MoshiWorker:
        @modal.enter()
        def load(self):
            self.voices = load_warm_voices()

        @modal.asgi_app()
        def web(self):
            from moshi_engine.watch.workers import publish
            from moshi_engine.wire.server import create_api

            self.app = create_api(self.voices, session_limits(), token=access_token(), metrics_token=metrics_token())
            # its figures, for the page's /metrics (a scrape there wakes no GPU)
            self.stop_publishing = publish(self.app.state.moshi.metrics, worker_figures,
                                           worker=os.environ.get("MODAL_TASK_ID", "worker"))
            return self.app

        @modal.exit()
        def drain(self):
            from moshi_engine.web import drain_from_thread

            if hasattr(self, "app"):
                drain_from_thread(self.app)
                self.stop_publishing()  # its last counts, then the page lets it go

    @app.function(cpu=PAGE.cores, memory=PAGE.memory_mib, secrets=SECRETS, max_containers=1,
                  scaledown_window=5 * MINUTES, timeout=REQUEST_TIMEOUT_S)
    @modal.concurrent(max_inputs=PAGE_REQUESTS + REQUESTS_PER_CONVERSATION * SLOTS_PER_GPU * MAX_WORKERS)
    @modal.asgi_app()
    def ui():
        from urllib.parse import quote

        from moshi_engine.watch.logs import configure_logging
        from moshi_engine.web import create_app

        configure_logging(CONFIG["MOSHI_LOG_FORMAT"])

        token = access_token()
        return create_app(
            # the workers are as private as the page: the page passes the token on
            remote=MoshiWorker().web.get_web_url() + "/api/chat" + (f"?token={quote(token)}" if token else ""),
            remote_capacity=MAX_WORKERS * SLOTS_PER_GPU,
            remote_voices=[voice.name for voice in VOICES],
            poll_remote_status=False,  # a status poll would wake a GPU worker
            connect_timeout_s=10 * MINUTES,  # cold start: image, weights from the Volume, warm-up
            limits=session_limits(),
            host="modal.run",
            token=token,
            metrics_token=metrics_token(),
            worker_metrics=worker_figures,  # every worker's figures, labelled, in this app's /metrics
        )


# ## Locally and on Hugging Face Spaces

# `python app.py` serves the same app with uvicorn. On a Space (`SPACE_ID` is set) it listens on
# 0.0.0.0:7860, as Spaces expect. Browsers give a microphone only to https pages and to
# http://localhost, so a page opened from another machine needs `--https` (a self-signed
# certificate, made at the first start and kept), a real certificate, `--share`, or an SSH tunnel.


def sessions_arg(value: str) -> int | str:
    if value == AUTO:
        return AUTO
    try:
        return explicit_sessions(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_args(argv=None):
    on_space = bool(os.environ.get("SPACE_ID"))
    parser = argparse.ArgumentParser(description="Talk with Moshi: a full-duplex voice chat page.")
    parser.add_argument("--model", default=os.environ.get("MOSHI_MODEL", MODEL),
                        help="Hugging Face repo, checkpoint directory, or 'tiny' (offline, random weights); "
                             "a comma-separated list serves each as a voice the visitor picks "
                             "(kyutai/moshiko-pytorch-bf16,kyutai/moshika-pytorch-bf16; NAME=MODEL names one)")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cuda', 'cuda:1', 'cpu'")
    parser.add_argument("--sessions", type=sessions_arg, default=os.environ.get("MOSHI_SESSIONS", AUTO),
                        help="conversations at once for each voice (slots of one batched Moshi), or 'auto': as "
                             "many as fit the GPU's free memory (up to 32; several voices share it); on a CPU 8 "
                             "for the tiny model, else 1. With --remote: sessions the page holds on the server")
    parser.add_argument("--context", type=int, default=CONTEXT, metavar="STEPS",
                        help="the LM's attention window per conversation, in 80 ms steps (default: the "
                             "checkpoint's, 3000 = 240 s for Moshiko): the KV cache of each slot, so a shorter "
                             "window fits more conversations, and Moshi attends to that much of the past alone")
    parser.add_argument("--in-process", action="store_true",
                        help="step the model in a thread of this process, not in a process of its own "
                             "(slower under load: the web server's Python then competes with the step's)")
    parser.add_argument("--host", default="0.0.0.0" if on_space else "127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    parser.add_argument("--https", action="store_true",
                        help="serve https with a self-signed certificate for this machine's names and addresses "
                             "(made at the first start, kept and reused): browsers on other machines need https "
                             "for the microphone, and ask once to accept it")
    parser.add_argument("--ssl-certfile", metavar="PEM", help="serve https with this certificate (with --ssl-keyfile)")
    parser.add_argument("--ssl-keyfile", metavar="PEM", help="the key of --ssl-certfile")
    parser.add_argument("--remote", metavar="URL",
                        help="serve the page only; every session talks to this Moshi server (/api/chat or /ws)")
    parser.add_argument("--queue", type=int, default=QUEUE,
                        help="places in the waiting line for a slot (0: refuse at once when every slot is taken)")
    parser.add_argument("--queue-timeout", type=float, default=QUEUE_TIMEOUT_S,
                        help="seconds a conversation may wait in line")
    parser.add_argument("--token", default=os.environ.get("MOSHI_ACCESS_TOKEN"),
                        help="make the app private: every route but /status and /metrics asks for this token "
                             "(better: set MOSHI_ACCESS_TOKEN, which no process list shows)")
    parser.add_argument("--metrics-token", default=os.environ.get("MOSHI_METRICS_TOKEN"),
                        help="put /metrics (Prometheus) behind this token of its own, sent as Authorization: "
                             "Bearer (better: set MOSHI_METRICS_TOKEN); without it /metrics is open like /status")
    parser.add_argument("--log-format", choices=("text", "json"), default=os.environ.get("MOSHI_LOG_FORMAT", "text"),
                        help="'text': readable lines; 'json': one JSON object a line, for log collectors")
    parser.add_argument("--session-limit", type=float, default=SESSION_LIMIT_S, help="seconds per conversation")
    parser.add_argument("--idle-limit", type=float, default=IDLE_LIMIT_S, help="seconds without audio")
    parser.add_argument("--reconnect-grace", type=float, default=RECONNECT_GRACE_S, metavar="SECONDS",
                        help="how long a conversation whose connection was lost keeps its slot for the visitor "
                             "to come back (an outage, a handover); then it ends and the slot is freed")
    parser.add_argument("--min-step-ms", type=float, default=0.0, metavar="MS",
                        help="make every model step last at least this long (80 ms is real time): the tiny "
                             "model as slow as a real Moshi at a full batch, to try networks and backlogs on a CPU")
    args = parser.parse_args(argv)
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        parser.error("--ssl-certfile and --ssl-keyfile go together")
    if args.reconnect_grace < 0 or args.min_step_ms < 0:
        parser.error("--reconnect-grace and --min-step-ms are at least 0")
    if args.context is not None and args.context < 1:
        parser.error("--context is a number of 80 ms steps, at least 1")
    try:
        args.voices = parse_voices(args.model)
    except ValueError as error:
        parser.error(str(error))
    if args.share and (args.https or args.ssl_certfile):
        parser.error("--share serves its own public https link (to this server's plain http): use it, or https")
    return args


def main(argv=None) -> int:
    from moshi_engine.conversation import SessionLimits
    from moshi_engine.engine import load_voices
    from moshi_engine.model.checkpoint import TINY, TINY_Q8, ModelUnavailableError
    from moshi_engine.model.loading import pick_device
    from moshi_engine.model.sizing import CapacityError
    from moshi_engine.watch.logs import configure_logging
    from moshi_engine.web import announce, create_app, serve
    from moshi_engine.wire.tls import self_signed_certificate

    args = parse_args(argv)
    configure_logging(args.log_format)
    log = logging.getLogger("app")
    limits = SessionLimits(max_session_s=args.session_limit, idle_s=args.idle_limit,
                           reconnect_grace_s=args.reconnect_grace)
    tls = (Path(args.ssl_certfile), Path(args.ssl_keyfile)) if args.ssl_certfile else None
    certificate = self_signed_certificate(args.host) if args.https and not tls else None

    public_host = args.host
    if args.share:
        public_host = open_share_link(args.host, args.port, log) or args.host

    if args.remote:
        capacity = 1 if args.sessions == AUTO else args.sessions
        web_app = create_app(remote=args.remote, remote_capacity=capacity, limits=limits, host=public_host,
                             token=args.token, metrics_token=args.metrics_token)
        voices = None
    else:
        for voice in args.voices:
            if pick_device(args.device).type == "cpu" and voice.model not in (TINY, TINY_Q8):
                log.warning("loading %s on a CPU: Moshi will not speak in real time; use a GPU, or --model tiny "
                            "to try the page", voice.model)
        try:
            voices = load_voices(args.model, device=args.device, sessions=args.sessions, queue=args.queue,
                                 queue_timeout_s=args.queue_timeout, model_process=not args.in_process,
                                 context=args.context, min_step_ms=args.min_step_ms)
        except (ModelUnavailableError, CapacityError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        web_app = create_app(voices, limits=limits, host=public_host, token=args.token,
                             metrics_token=args.metrics_token)

    for level, message in announce(args.host, args.port, certificate or tls, share=args.share, private=bool(args.token),
                                   behind_https=bool(os.environ.get("SPACE_ID"))):
        log.log(level, message)
    try:
        serve(web_app, args.host, args.port, tls=certificate.files if certificate else tls)
    finally:
        if voices is not None:
            voices.close()
    lost = voices is not None and any(engine.lost for engine in voices)
    return 1 if lost else 0  # lost: serve() stopped for it


def open_share_link(host: str, port: int, log) -> str | None:
    """A public https://*.gradio.live link to this server through Gradio's share tunnel."""
    import secrets
    from urllib.parse import urlparse

    from gradio import networking

    local = "127.0.0.1" if host == "0.0.0.0" else host
    try:
        url = networking.setup_tunnel(local, port, secrets.token_urlsafe(32), None, None)
    except Exception as error:  # no internet, or Gradio's share server refused
        log.error("could not open a share link (%s); serving locally only", error)
        return None
    log.info("public share link: %s", url)
    return urlparse(url).hostname


if __name__ == "__main__":
    sys.exit(main())
