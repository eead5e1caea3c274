"""Which ICE servers WebRTC gets, by where the page is served and what the environment holds,
how long the server keeps a connection whose browser stopped answering, and closing the server's
side of an attempt that the page gave up because it never connected.

None on loopback (browser and server share the machine); else TURN from the
environment (explicit servers, Cloudflare, Twilio, or FastRTC's Cloudflare
credentials through HF_TOKEN); else a public STUN server, or those of MOSHI_STUN_URLS
(comma-separated; set and empty: none, for a private network without internet, where a
STUN lookup only delays the answer until it times out).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import time
from collections.abc import Mapping
from typing import Any

import aioice.ice
import aioice.stun
from fastrtc.credentials import get_cloudflare_turn_credentials_async, get_twilio_turn_credentials

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
# ICE consent (RFC 7675): the server asks the browser every CONSENT_INTERVAL_S (0.8 to 1.2 times
# that) whether it still wants the media, and consent expires CONSENT_EXPIRY_S after the last
# answer, RFC 7675's 30 s. aioice waits 0.5 s for each answer and gives up after 6 unanswered in
# a row: a call over a 600 ms round trip (a satellite) ended after about 30 s, and an outage of
# 8 s ended any call. Here each check is sent again while it waits (CONSENT_RETRANSMISSIONS: it
# waits 0.5 + 1 + 2 s), and only the expiry ends the connection. A browser that vanished is
# noticed sooner by the conversation itself: no audio for the reconnect grace ends it (rtc.py).
CONSENT_INTERVAL_S = 1.0
CONSENT_RETRANSMISSIONS = 2
CONSENT_EXPIRY_S = 30.0
PUBLIC_STUN_URLS = ["stun:stun.l.google.com:19302"]

# Environment variables, by ICE source, in order of precedence: explicit TURN servers
# first, then the TURN services; HF_TOKEN last, since it is often set for other reasons.
ICE_SOURCES: dict[str, tuple[str, ...]] = {
    "turn": ("TURN_URLS", "TURN_USERNAME", "TURN_CREDENTIAL"),
    "cloudflare": ("CLOUDFLARE_TURN_KEY_ID", "CLOUDFLARE_TURN_KEY_API_TOKEN"),
    "twilio": ("TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN"),
    "hf": ("HF_TOKEN",),
}


def keep_consent_through_outages() -> None:
    """Have every WebRTC connection of this process check its browser's consent as above: long
    round trips are answered, and only CONSENT_EXPIRY_S without any answer closes the
    connection (then FastRTC ends the conversation and its slot is freed). Replaces aioice's
    `Connection.query_consent` (aioice 0.10 to 0.13 share its shape), which every connection
    runs once connected; idempotent."""
    aioice.ice.Connection.query_consent = _query_consent


async def _query_consent(self: aioice.ice.Connection) -> None:
    assert self.remote_password is not None  # consent checks start once connect() has it
    answered = time.monotonic()
    while True:
        await asyncio.sleep(CONSENT_INTERVAL_S * (0.8 + 0.4 * random.random()))
        for pair in list(self._nominated.values()):
            request = self.build_request(pair, nominate=False)
            try:
                await pair.protocol.request(request, pair.remote_addr, integrity_key=self.remote_password.encode(),
                                            retransmissions=CONSENT_RETRANSMISSIONS)
                answered = time.monotonic()
            except aioice.stun.TransactionError:
                pass
        if time.monotonic() - answered >= CONSENT_EXPIRY_S:
            log.info("ICE consent expired: no answer from the browser for %.0f s", CONSENT_EXPIRY_S)
            self._query_consent_task = None
            return await self.close()


def ice_source(host: str, env: Mapping[str, str] = os.environ) -> str:
    """Where a page served on `host` gets its ICE servers: "none" on loopback (the browser
    and the server share the machine), else the first source of `ICE_SOURCES` whose
    variables are set, else "stun". A source set halfway raises ValueError naming what
    is missing, so a misconfigured deployment fails at start, not at a user's first call."""
    if host in LOOPBACK_HOSTS:
        return "none"
    for source, names in ICE_SOURCES.items():
        present = [name for name in names if env.get(name, "").strip()]
        if present and len(present) < len(names):
            missing = ", ".join(name for name in names if name not in present)
            raise ValueError(f"{', '.join(present)} set but {missing} missing: set all of {', '.join(names)}")
        if present:
            return source
    return "stun" if _stun_urls(env) else "none"


def _stun_urls(env: Mapping[str, str] = os.environ) -> list[str]:
    if "MOSHI_STUN_URLS" not in env:
        return list(PUBLIC_STUN_URLS)
    return [url.strip() for url in env["MOSHI_STUN_URLS"].split(",") if url.strip()]


def _stun_servers(env: Mapping[str, str] = os.environ) -> list[dict[str, Any]]:
    urls = _stun_urls(env)
    return [{"urls": urls}] if urls else []


async def browser_rtc_configuration(host: str, env: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """The RTCPeerConnection configuration for the browser (`{}` on loopback).

    TURN credentials from Cloudflare (directly or through HF_TOKEN) and Twilio are
    short-lived, so this runs for every new connection; if fetching them fails the
    page still gets STUN, which works on most networks, and the failure is logged.
    """
    source = ice_source(host, env)
    if source == "none":
        return {}
    if source == "stun":
        return {"iceServers": _stun_servers(env)}
    if source == "turn":
        turn = {
            "urls": [url.strip() for url in env["TURN_URLS"].split(",") if url.strip()],
            "username": env["TURN_USERNAME"],
            "credential": env["TURN_CREDENTIAL"],
        }
        return {"iceServers": _stun_servers(env) + [turn]}
    try:
        if source == "cloudflare":
            # hf_token="" keeps fastrtc from preferring an HF_TOKEN that is also set.
            return await get_cloudflare_turn_credentials_async(
                turn_key_id=env["CLOUDFLARE_TURN_KEY_ID"],
                turn_key_api_token=env["CLOUDFLARE_TURN_KEY_API_TOKEN"],
                hf_token="",
            )
        if source == "twilio":
            return await asyncio.to_thread(
                get_twilio_turn_credentials,
                twilio_sid=env["TWILIO_ACCOUNT_SID"],
                twilio_token=env["TWILIO_AUTH_TOKEN"],
            )
        return await get_cloudflare_turn_credentials_async(hf_token=env["HF_TOKEN"])
    except Exception:
        log.warning("could not get TURN credentials from %s; the page falls back to STUN only", source, exc_info=True)
        return {"iceServers": _stun_servers()}


def server_rtc_configuration(host: str, env: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """The server side's ICE servers: none on loopback (no STUN lookups to wait for),
    else STUN so that the server learns its public address. The browser's TURN relay
    is enough for the pair to connect, so the server needs no TURN of its own."""
    return {"iceServers": [] if host in LOOPBACK_HOSTS else _stun_servers(env)}


# ## Attempts that never connected


def _offered_with(pcs: dict[str, Any], ufrag: str) -> list[tuple[str, Any]]:
    """(id, connection) of FastRTC's peer connections (`WebRTC.pcs`) whose offer carried the ICE
    username fragment `ufrag`: what the page knows of its connection."""
    if not ufrag:
        return []
    line = re.compile(rf"^a=ice-ufrag:{re.escape(ufrag)}\r?$", re.MULTILINE)
    return [(webrtc_id, pc) for webrtc_id, pc in list(pcs.items())
            if pc.remoteDescription is not None and line.search(pc.remoteDescription.sdp)]


def webrtc_id_of(pcs: dict[str, Any], ufrag: str) -> str | None:
    """The id of the connection whose offer carried `ufrag`, or None."""
    return next((webrtc_id for webrtc_id, _ in _offered_with(pcs, ufrag)), None)


async def abandon_unconnected(pcs: dict[str, Any], ufrag: str) -> int:
    """Close FastRTC's peer connections (`WebRTC.pcs`, aiortc) whose offer carried the ICE
    username fragment `ufrag` and that have not connected; returns how many.

    The page gives up on a WebRTC attempt that does not connect and talks over its websocket
    instead; FastRTC itself would keep the server's side for 30 s, holding one of the page's
    WebRTC places. The page knows its offer's ufrag, not FastRTC's connection id. Only an
    attempt that never connected is closed: its handler never started (FastRTC starts it once
    the data channel opens), so it holds no slot and no place in line.
    """
    closed = 0
    for _, pc in _offered_with(pcs, ufrag):
        if pc.connectionState == "connected":
            continue
        await pc.close()  # FastRTC's "closed" listener cleans up the rest (and shuts the handler down)
        closed += 1
    if closed:
        log.info("closed %d WebRTC attempt(s) that the page abandoned", closed)
    return closed
