"""The network emulator measures what it was set to: delay, jitter without reordering, loss, outages,
blocked UDP and a handover, between a client namespace and an echo server in the server namespace.

Tolerances do not depend on CPU speed: a packet is never early, and at the median no more than
25 ms late; loss is within 4.5 binomial standard deviations.
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import pytest

from moshi_engine.bench.netem import EVENTS, PROFILES, NetworkEmulator, Profile, missing

PORT = 7
CHROMIUM = "/usr/bin/chromium"
LATE_MS = 25.0

# UDP: answers "<source address> <payload>"; TCP: sends "<source address>\n", then echoes.
ECHO_SERVER = """
import socket, sys, threading
host, port = sys.argv[1], int(sys.argv[2])
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind((host, port))
tcp = socket.create_server((host, port))
def serve_udp():
    while True:
        data, peer = udp.recvfrom(65536)
        udp.sendto(peer[0].encode() + b" " + data, peer)
def serve_tcp(conn, peer):
    conn.sendall(peer[0].encode() + b"\\n")
    while data := conn.recv(65536):
        conn.sendall(data)
threading.Thread(target=serve_udp, daemon=True).start()
print("ready", flush=True)
while True:
    threading.Thread(target=serve_tcp, args=tcp.accept(), daemon=True).start()
"""


@pytest.fixture
def net():
    if missing():
        pytest.skip(missing())
    with NetworkEmulator("loopback", seed=1) as emulator:
        server = emulator.popen("server", [sys.executable, "-c", ECHO_SERVER, emulator.server_address, str(PORT)],
                                stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "ready"
        yield emulator


def udp_client(net: NetworkEmulator, timeout: float = 1.0) -> socket.socket:
    sock = net.socket("client", socket.SOCK_DGRAM)
    sock.settimeout(timeout)
    return sock


def ping(net: NetworkEmulator, sock: socket.socket, payload: bytes = b"ping") -> bytes | None:
    """The echo server's answer (`<source> <payload>`), or None when none came within the socket's timeout."""
    sock.sendto(payload, (net.server_address, PORT))
    try:
        return sock.recv(65536)
    except TimeoutError:
        return None


def round_trips_ms(net: NetworkEmulator, count: int) -> list[float]:
    sock = udp_client(net)
    times = []
    for _ in range(count):
        start = time.monotonic()
        assert ping(net, sock) is not None
        times.append((time.monotonic() - start) * 1000)
    sock.close()
    return times


def tcp_client(net: NetworkEmulator) -> tuple[socket.socket, str]:
    """A TCP connection to the echo server, and the client address the server saw."""
    sock = net.socket("client", socket.SOCK_STREAM)
    sock.settimeout(2.0)
    sock.connect((net.server_address, PORT))
    seen = b""
    while not seen.endswith(b"\n"):
        seen += sock.recv(100)
    return sock, seen.decode().strip()


def blast(net: NetworkEmulator, count: int, interval: float) -> list[int]:
    """Send `count` numbered datagrams `interval` apart; the numbers of the answers, in arrival order."""
    sock = udp_client(net, timeout=1.0)
    received: list[int] = []

    def receive():
        while len(received) < count:
            try:
                received.append(int(sock.recv(100).split()[1]))
            except TimeoutError:
                return

    reader = threading.Thread(target=receive)
    reader.start()
    for seq in range(count):
        sock.sendto(str(seq).encode(), (net.server_address, PORT))
        time.sleep(interval)
    reader.join()
    sock.close()
    return received


def test_profiles_are_the_named_one_way_links():
    assert PROFILES == {
        "loopback": Profile(0, 0, 0),
        "wifi": Profile(5, 2, 0.001),
        "4g": Profile(40, 10, 0.01),
        "poor": Profile(150, 40, 0.03),
        "satellite": Profile(300, 20, 0.005),
    }
    assert EVENTS == ("outage-3s", "outage-10s", "udp-blocked", "handover")


@pytest.mark.parametrize("delay_ms", [0, 40])
def test_a_round_trip_takes_twice_the_one_way_delay(net, delay_ms):
    net.set_profile(Profile(delay_ms))
    times = round_trips_ms(net, 15)
    assert min(times) >= 2 * delay_ms
    assert statistics.median(times) <= 2 * delay_ms + LATE_MS


def test_jitter_spreads_round_trips_within_its_bounds(net):
    net.set_profile(Profile(30, 10))
    times = round_trips_ms(net, 20)
    assert min(times) >= 2 * (30 - 10)
    assert statistics.median(times) <= 2 * 30 + LATE_MS
    assert max(times) - min(times) >= 8  # the spread of two uniform ±10 ms draws, not a constant delay


def test_jitter_never_reorders_packets(net):
    # 30 ms of jitter span against 1 ms between packets: independent delays would reorder nearly all
    net.set_profile(Profile(20, 15))
    assert blast(net, 400, interval=0.001) == list(range(400))


def test_loss_drops_the_set_fraction_each_way(net):
    net.set_profile(Profile(0, 0, loss=0.1))
    received = blast(net, 2000, interval=0.0005)
    stats = net.stats()
    up, down = stats["up"], stats["down"]
    assert up["forwarded"] + up["lost"] == 2000
    assert down["forwarded"] + down["lost"] == up["forwarded"]
    for way in (up, down):
        sent = way["forwarded"] + way["lost"]
        assert abs(way["lost"] - 0.1 * sent) <= 4.5 * math.sqrt(sent * 0.1 * 0.9)
    assert len(received) == down["forwarded"]  # every packet the wire let through arrived


def test_a_cut_passes_nothing_and_a_restore_everything(net):
    net.set_profile(Profile(10))
    sock = udp_client(net, timeout=0.1)
    net.cut()
    assert [ping(net, sock) for _ in range(10)] == [None] * 10
    assert net.stats()["up"]["cut"] == 10
    net.restore()
    sock.settimeout(1.0)
    assert all(ping(net, sock) for _ in range(10))


def test_a_cut_drops_the_packets_already_on_the_wire(net):
    net.set_profile(Profile(200))
    sock = udp_client(net, timeout=0.6)
    sock.sendto(b"in flight", (net.server_address, PORT))
    time.sleep(0.05)
    net.outage(0.1)
    with pytest.raises(TimeoutError):
        sock.recv(100)
    assert net.stats()["up"]["cut"] == 1


async def test_an_async_outage_loses_what_is_sent_during_it_and_nothing_after(net):
    net.set_profile(Profile(10))
    loop = asyncio.get_running_loop()
    sock = net.socket("client", socket.SOCK_DGRAM)
    sock.setblocking(False)
    sent: dict[int, float] = {}
    answered: set[int] = set()

    async def send():
        for seq in range(60):  # every 20 ms for 1.2 s
            sent[seq] = time.monotonic()
            await loop.sock_sendto(sock, str(seq).encode(), (net.server_address, PORT))
            await asyncio.sleep(0.02)

    async def receive():
        while True:
            answered.add(int((await loop.sock_recv(sock, 100)).split()[1]))

    receiver = asyncio.create_task(receive())
    sender = asyncio.create_task(send())
    await asyncio.sleep(0.3)
    requested = time.monotonic()
    cut_at, restore_at = await net.outage_async(0.4)  # when the link was surely down
    restored_at = time.monotonic()
    await sender
    await asyncio.sleep(0.2)
    receiver.cancel()
    sock.close()
    assert not {seq for seq, at in sent.items() if cut_at <= at <= restore_at} & answered
    assert {seq for seq, at in sent.items() if at < requested - 0.05 or at > restored_at} <= answered


def test_blocked_udp_passes_no_datagram_while_tcp_still_connects(net):
    net.block_udp()
    assert ping(net, udp_client(net, timeout=0.3)) is None
    sock, seen = tcp_client(net)
    sock.sendall(b"over tcp")
    assert sock.recv(100) == b"over tcp"
    sock.close()
    assert net.stats()["up"]["udp_blocked"] == 1
    net.block_udp(False)
    assert ping(net, udp_client(net)) is not None


def test_a_handover_gives_the_server_a_new_source_and_ends_old_flows(net):
    old_connection, seen = tcp_client(net)
    assert seen == net.client_address
    old = net.client_address
    new = net.handover()
    assert new != old and net.client_address == new
    old_connection.settimeout(1.0)
    old_connection.sendall(b"anyone?")
    with pytest.raises(TimeoutError):
        old_connection.recv(100)
    new_connection, seen = tcp_client(net)
    assert seen == new
    new_connection.sendall(b"hello")
    assert new_connection.recv(100) == b"hello"
    assert ping(net, udp_client(net)).split()[0].decode() == new
    # the client's kernel already refuses the old source; the wire drops what the server still sends there
    with net.socket("server", socket.SOCK_DGRAM) as server_side:
        server_side.sendto(b"still there?", (old, PORT))
    time.sleep(0.1)
    assert net.stats()["down"]["old_address"] >= 1  # and the old connection's retransmissions, if any
    old_connection.close()
    new_connection.close()


def test_the_browser_wrapper_runs_its_program_in_the_client_namespace(net):
    # the wrapper execs whatever program it wraps: Python stands in for the browser here
    program = f"import socket; print(socket.create_connection(({net.server_address!r}, {PORT})).recv(100).decode())"
    done = subprocess.run([net.chromium(path=sys.executable), "-c", program], capture_output=True, text=True,
                          timeout=10)
    assert done.stdout.strip() == net.client_address


def test_chromium_from_the_wrapper_loads_a_page_from_the_server_namespace(net):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no {CHROMIUM}")
    sync_api = pytest.importorskip("playwright.sync_api")
    net.set_profile(Profile(20))
    page_server = net.popen("server", [sys.executable, "-m", "http.server", "8000", "--bind", net.server_address],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=net.chromium(CHROMIUM))
        page = browser.new_page()
        for _ in range(50):  # until the page server listens
            try:
                page.goto(f"http://{net.server_address}:8000/")
                break
            except sync_api.Error:
                time.sleep(0.1)
        assert page.title() == "Directory listing for /"
        browser.close()
    page_server.terminate()
    assert page_server.stderr.read().startswith(net.client_address)  # the server saw the client's address


def test_closing_removes_the_namespaces_and_ends_what_ran_in_them():
    if missing():
        pytest.skip(missing())
    with NetworkEmulator() as net:
        sleeper = net.popen("server", ["sleep", "60"])
    assert sleeper.poll() is not None
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert net.server_ns not in names and net.client_ns not in names


def test_leftovers_of_a_dead_process_are_removed_at_start():
    if missing():
        pytest.skip(missing())
    dead = subprocess.Popen(["true"])
    dead.wait()
    leftover = f"moshinet-{dead.pid}-0-server"
    subprocess.run(["ip", "netns", "add", leftover], check=True)
    with NetworkEmulator():
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert leftover not in names
