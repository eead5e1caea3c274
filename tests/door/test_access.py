"""A private deployment: every route but /status asks for the access token, on a real server
with the page mounted."""

from __future__ import annotations

import os
from urllib.parse import quote

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import httpx  # noqa: E402
import pytest  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402
from websockets.exceptions import InvalidStatus  # noqa: E402

from moshi_engine.audio import SAMPLE_RATE  # noqa: E402
from moshi_engine.door.access import COOKIE  # noqa: E402
from moshi_engine.web import create_app  # noqa: E402
from moshi_engine.wire.protocol import HANDSHAKE, CloseCode  # noqa: E402
from moshi_engine.wire.remote import exchange  # noqa: E402
from tests.live import serve_asgi  # noqa: E402

TOKEN = "correct horse battery staple"
WRONG = "hunter2"


@pytest.fixture(scope="module")
def private(tiny_engine):
    with serve_asgi(create_app(tiny_engine, token=TOKEN)) as url:
        yield url


@pytest.fixture(scope="module")
def web_component_id(private) -> int:
    config = httpx.get(private + "/config", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    return next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "moshi-webrtc")


ROUTES = [
    ("GET", "/", None),
    ("GET", "/config", None),
    ("GET", "/gradio_api/info", None),
    ("POST", "/gradio_api/queue/join", {"data": [], "fn_index": 0, "session_hash": "x"}),
    ("POST", "/gradio_api/component_server/", {"session_hash": "x", "component_id": 0, "fn_name": "offer",
                                               "data": {"sdp": "", "type": "offer", "webrtc_id": "x"}}),
    ("GET", "/gradio_api/file=/etc/hostname", None),
    ("GET", "/recordings/anything", None),
    ("GET", "/moshi-static/page.js", None),
    ("POST", "/webrtc/abandon", {"ufrag": "x"}),
]


def test_status_answers_without_the_token(private):
    response = httpx.get(private + "/status")
    assert response.status_code == 200 and response.json()["status"] == "ready"


@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_every_other_route_asks_for_the_token(private, method, path, body):
    without = httpx.request(method, private + path, json=body)
    assert without.status_code == 401 and "private" in without.text
    assert without.headers["www-authenticate"].startswith("Bearer")
    wrong = httpx.request(method, private + path, json=body, headers={"Authorization": f"Bearer {WRONG}"})
    assert wrong.status_code == 403
    wrong_in_url = httpx.request(method, private + path, json=body, params={"token": WRONG})
    assert wrong_in_url.status_code == 403


@pytest.mark.parametrize("path", ["/", "/config", "/gradio_api/info", "/moshi-static/page.js"])
def test_the_token_opens_the_page_and_gradios_routes(private, path):
    with httpx.Client(base_url=private) as browser:
        assert browser.get("/", params={"token": TOKEN}).status_code == 303  # sets the cookie
        assert browser.get(path).status_code == 200
    assert httpx.get(private + path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert httpx.get(private + path, params={"token": TOKEN}, follow_redirects=True).status_code == 200
    assert httpx.get(private + path, headers={"Cookie": f"{COOKIE}={WRONG}"}).status_code == 403  # a forged cookie


def test_a_browser_opening_the_tokened_link_gets_a_cookie_and_a_clean_address(private):
    with httpx.Client(base_url=private) as browser:
        first = browser.get("/", params={"token": TOKEN, "lang": "fr"})
        assert first.status_code == 303 and first.headers["location"] == "/?lang=fr"  # no token in the address
        cookie = first.headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE}=") and "HttpOnly" in cookie and "SameSite=Lax" in cookie
        page = browser.get("/")  # the cookie now carries the token
        assert page.status_code == 200 and "Moshi" in page.text
        assert browser.get("/config").status_code == 200


def test_the_webrtc_offer_route_answers_with_the_token(private, web_component_id):
    body = {"session_hash": "x", "component_id": web_component_id, "fn_name": "turn", "data": {}}
    response = httpx.post(private + "/gradio_api/component_server/", json=body,
                          headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200 and response.json() == {}  # no ICE servers on loopback


@pytest.mark.parametrize("path", ["/ws", "/api/chat"])
async def test_websockets_are_refused_before_any_handshake_without_the_token(private, path):
    base = private.replace("http", "ws") + path
    for url, headers in ((base, None), (base + f"?token={WRONG}", None), (base, {"Authorization": f"Bearer {WRONG}"})):
        with pytest.raises(InvalidStatus) as refused:
            await connect(url, additional_headers=headers)
        assert refused.value.response.status_code == 403


async def test_websockets_talk_with_the_token_in_the_url_or_a_bearer_header(private, tiny_engine, hello_pcm):
    base = private.replace("http", "ws") + "/api/chat"
    async with connect(base, additional_headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
        assert await ws.recv() == HANDSHAKE
    result = await exchange(base + f"?token={quote(TOKEN)}", hello_pcm[:SAMPLE_RATE], realtime=False)
    assert result.close_code == CloseCode.NORMAL and result.pcm.size > 0


def test_a_public_app_asks_for_nothing(tiny_engine):
    with serve_asgi(create_app(tiny_engine)) as url:
        assert httpx.get(url + "/config").status_code == 200
