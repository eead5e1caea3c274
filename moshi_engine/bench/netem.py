"""A network between a client and the server, on one machine: Wi-Fi, 4G, a poor link, a satellite.

What it emulates. Two network namespaces, "server" and "client", joined by one IP link: each side
has a TUN device with its own /32 address and a route to the other side through it, and a wire
process forwards the IP packets between the two devices. Per direction, the wire holds each
packet for a fixed delay plus uniform jitter without reordering (a packet never overtakes the one
before it, as on one path), drops packets at random (seeded), and on command cuts the link both
ways (an outage), drops UDP (a network that lets only TCP through, where WebRTC must fall back to
TURN over TCP), or moves the client to a new address (a handover: flows on the old address die,
new ones work, as when a phone goes from Wi-Fi to 4G).

Why in userspace. The usual tool, `tc qdisc ... netem`, needs the sch_netem kernel module, which
the CI kernel lacks (nor are there dummy or prio qdiscs). Namespaces and TUN devices
are there, and a wire in its own process (its own GIL: its timing does not compete with the test
or the benchmark that drives it) keeps time to about a millisecond, well inside what it emulates.
IPv4 only: the TUN devices get no IPv6 addresses, so no router solicitations cross the wire.

How to use it (as root; `missing()` says what a machine lacks):

    with NetworkEmulator("4g", seed=1) as net:
        net.popen("server", [sys.executable, "-m", "http.server", "8000"])
        page = f"http://{net.server_address}:8000/"
        subprocess.run(net.command("client", ["curl", page]))    # or net.socket("client", ...)
        net.outage(3.0)                                            # or await net.outage_async(3.0)
        net.handover()
        browser = await playwright.chromium.launch(executable_path=net.chromium())

By hand, a server behind a 4G link that drops out for 10 s after 20 s:

    python -m moshi_engine.bench.netem run --profile 4g --event outage-10s --at 20 -- python app.py
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import ctypes
import dataclasses
import fcntl
import functools
import ipaddress
import itertools
import json
import logging
import os
import random
import re
import select
import shutil
import socket as socketlib
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Profile:
    """One way of the link: each packet waits `delay_ms` plus uniform jitter in ±`jitter_ms`; `loss` in [0, 1]."""

    delay_ms: float
    jitter_ms: float = 0.0
    loss: float = 0.0


PROFILES: dict[str, Profile] = {
    "loopback": Profile(0),
    "wifi": Profile(5, 2, 0.001),
    "4g": Profile(40, 10, 0.01),
    "poor": Profile(150, 40, 0.03),
    "satellite": Profile(300, 20, 0.005),
}
EVENTS: tuple[str, ...] = ("outage-3s", "outage-10s", "udp-blocked", "handover")
SIDES = ("server", "client")
COUNTS = ("forwarded", "lost", "cut", "udp_blocked", "old_address", "not_ipv4")

PREFIX = "moshinet"
TUN_NAME = "tun0"  # one per namespace, so the name need not be unique
_NETNS_DIR = Path("/run/netns")
_CLONE_NEWNET = 0x40000000
_TUNSETIFF, _IFF_TUN, _IFF_NO_PI = 0x400454CA, 0x0001, 0x1000
_UDP = 17
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]
_instances = itertools.count()

log = logging.getLogger(__name__)


class EmulatorError(RuntimeError):
    """The emulator could not be set up, or the wire refused a command."""


# ## Namespaces


def _ip(*argv: str) -> None:
    done = subprocess.run(["ip", *argv], capture_output=True, text=True)
    if done.returncode:
        raise EmulatorError(f"ip {' '.join(argv)}: {done.stderr.strip()}")


def in_namespace(namespace: str, make):
    """`make()` called in a thread that joined the network namespace: sockets and TUN fds it opens stay there.

    setns is per thread, so the rest of this process stays where it was.
    """
    result: list = []

    def join_and_make():
        try:
            fd = os.open(_NETNS_DIR / namespace, os.O_RDONLY)
            try:
                if ctypes.CDLL(None, use_errno=True).setns(fd, _CLONE_NEWNET):
                    raise OSError(ctypes.get_errno(), f"setns into {namespace}")
            finally:
                os.close(fd)
            result.append((make(), None))
        except BaseException as error:  # handed to the caller's thread
            result.append((None, error))

    thread = threading.Thread(target=join_and_make, name=f"netns-{namespace}")
    thread.start()
    thread.join()
    value, error = result[0]
    if error is not None:
        raise error
    return value


def open_tun(namespace: str) -> int:
    """A non-blocking fd for a new TUN device `TUN_NAME` in that namespace; the device lives as long as the fd."""

    def make() -> int:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", TUN_NAME.encode(), _IFF_TUN | _IFF_NO_PI))
        return fd

    return in_namespace(namespace, make)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def remove_leftovers() -> None:
    """Delete `moshinet-<pid>-*` namespaces whose process is dead (a run that was killed)."""
    for path in _NETNS_DIR.glob(f"{PREFIX}-*") if _NETNS_DIR.is_dir() else ():
        match = re.fullmatch(rf"{PREFIX}-(\d+)-.*", path.name)
        if match and not _alive(int(match[1])):
            subprocess.run(["ip", "netns", "del", path.name], capture_output=True)


@functools.cache
def missing() -> str | None:
    """A sentence naming what this machine lacks for the emulator, or None when it has it all."""
    if os.geteuid() != 0:
        return f"network emulation needs root (namespaces, TUN devices); this runs as uid {os.geteuid()}"
    if shutil.which("ip") is None:
        return "network emulation needs the `ip` command (Debian package iproute2)"
    if not os.path.exists("/dev/net/tun"):
        return "network emulation needs TUN devices, and there is no /dev/net/tun"
    probe = f"{PREFIX}-{os.getpid()}-probe"
    try:
        _ip("netns", "add", probe)
    except EmulatorError as error:
        return f"network namespaces are refused here ({error})"
    try:
        os.close(open_tun(probe))
    except OSError as error:
        return f"TUN devices are refused in a network namespace ({error})"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


# ## The wire: a process that forwards packets between the two TUN devices


class _Direction:
    """Packets one way: held in release order (FIFO, since release times never decrease), then written out."""

    def __init__(self, out_fd: int, rng: random.Random):
        self.out_fd, self.rng = out_fd, rng
        self.queue: deque[tuple[float, bytes]] = deque()
        self.last_release = 0.0
        self.counts = dict.fromkeys(COUNTS, 0)

    def arrive(self, packet: bytes, now: float, profile: Profile, verdict: str | None) -> None:
        if verdict is None and self.rng.random() < profile.loss:
            verdict = "lost"
        if verdict is not None:
            self.counts[verdict] += 1
            return
        wait = max(0.0, profile.delay_ms + self.rng.uniform(-profile.jitter_ms, profile.jitter_ms)) / 1000
        self.last_release = max(self.last_release, now + wait)
        self.queue.append((self.last_release, packet))

    def release(self, now: float) -> float | None:
        """Write out what is due; the time the next packet is due, if any."""
        while self.queue and self.queue[0][0] <= now:
            packet = self.queue.popleft()[1]
            try:
                os.write(self.out_fd, packet)
                self.counts["forwarded"] += 1
            except OSError:  # the device went down under us (closing): the packet is gone, as on a wire
                self.counts["cut"] += 1
        return self.queue[0][0] if self.queue else None

    def refilter(self, verdict) -> None:
        """Apply a new rule to the packets already on the wire (an outage takes them too)."""
        kept = deque()
        for due, packet in self.queue:
            reason = verdict(packet)
            if reason is None:
                kept.append((due, packet))
            else:
                self.counts[reason] += 1
        self.queue = kept


class Wire:
    """Both TUN fds and the rules; `serve()` runs until its stdin closes, one JSON reply line per command line."""

    def __init__(self, server_ns: str, client_ns: str, seed: int):
        self.fds = {side: open_tun(ns) for side, ns in zip(SIDES, (server_ns, client_ns), strict=True)}
        self.directions = {
            "up": _Direction(self.fds["server"], random.Random(f"{seed}:up")),  # client to server
            "down": _Direction(self.fds["client"], random.Random(f"{seed}:down")),  # server to client
        }
        self.profile = PROFILES["loopback"]
        self.is_cut = self.udp_blocked = False
        self.old_addresses: set[bytes] = set()

    def verdict(self, packet: bytes) -> str | None:
        """Why the rules drop this packet, or None."""
        if len(packet) < 20 or packet[0] >> 4 != 4:
            return "not_ipv4"
        if self.is_cut:
            return "cut"
        if self.udp_blocked and packet[9] == _UDP:
            return "udp_blocked"
        if packet[12:16] in self.old_addresses or packet[16:20] in self.old_addresses:
            return "old_address"
        return None

    def command(self, request: dict) -> dict:
        op = request.get("op")
        if op == "profile":
            self.profile = Profile(float(request["delay_ms"]), float(request["jitter_ms"]), float(request["loss"]))
        elif op in ("cut", "restore"):
            self.is_cut = op == "cut"
        elif op == "block_udp":
            self.udp_blocked = bool(request["blocked"])
        elif op == "drop_address":
            self.old_addresses.add(ipaddress.IPv4Address(request["address"]).packed)
        elif op != "stats":
            return {"error": f"unknown op {op!r}"}
        for direction in self.directions.values():
            direction.refilter(self.verdict)
        return {name: dict(d.counts, queued=len(d.queue)) for name, d in self.directions.items()}

    def serve(self) -> None:
        inputs = {self.fds["client"]: self.directions["up"], self.fds["server"]: self.directions["down"]}
        pending = b""
        try:  # the wire keeps time for the whole link: ahead of the work it carries, where allowed
            os.setpriority(os.PRIO_PROCESS, 0, -10)
        except OSError:
            pass
        print(json.dumps({"ready": True}), flush=True)
        while True:
            now = time.monotonic()
            due = [t for d in self.directions.values() if (t := d.release(now)) is not None]
            # select, not epoll: epoll rounds its timeout up to whole milliseconds
            readable, _, _ = select.select([0, *inputs], [], [], max(0.0, min(due) - now) if due else None)
            now = time.monotonic()
            for fd in readable:
                if fd == 0:
                    data = os.read(0, 65536)
                    if not data:
                        return
                    pending += data
                    while b"\n" in pending:
                        line, pending = pending.split(b"\n", 1)
                        try:
                            reply = self.command(json.loads(line))
                        except (ValueError, KeyError, TypeError) as error:
                            reply = {"error": f"bad command {line!r}: {error}"}
                        print(json.dumps(reply), flush=True)
                    continue
                while True:
                    try:
                        packet = os.read(fd, 65536)
                    except BlockingIOError:
                        break
                    inputs[fd].arrive(packet, now, self.profile, self.verdict(packet))


# ## The emulator: namespaces, addresses, the wire, and what runs on either side


class NetworkEmulator:
    """A client namespace and a server namespace joined by an emulated link; `close()` (or `with`) removes them."""

    def __init__(self, profile: str | Profile = "loopback", seed: int = 0):
        problem = missing()
        if problem:
            raise EmulatorError(problem)
        remove_leftovers()
        n = next(_instances)
        name = f"{PREFIX}-{os.getpid()}-{n}"
        self.server_ns, self.client_ns = f"{name}-server", f"{name}-client"
        # One /24 per instance: the server's half below .128, the client's (and its handover addresses) above.
        # The namespaces isolate instances anyway; distinct subnets keep captures and logs unambiguous.
        index = (os.getpid() % 1024) * 16 + n % 16
        subnet = ipaddress.IPv4Network(f"10.{64 + (index >> 8)}.{index & 255}.0/24")
        self._server_half, self._client_half = subnet.subnets()
        self.server_address = str(self._server_half[1])
        self.client_address = str(self._client_half[1])
        self._handovers = 0
        self._processes: list[subprocess.Popen] = []
        self._lock = threading.Lock()
        self._wire: subprocess.Popen | None = None
        self._scripts = Path(tempfile.mkdtemp(prefix=f"{name}-"))
        atexit.register(self.close)
        try:
            self._start(seed)
            self.set_profile(profile)
        except BaseException:
            self.close()
            raise

    def _start(self, seed: int) -> None:
        for ns in (self.server_ns, self.client_ns):
            _ip("netns", "add", ns)
        self._wire = subprocess.Popen(
            [sys.executable, "-m", "moshi_engine.bench.netem", "wire", self.server_ns, self.client_ns, "--seed",
             str(seed)],
            cwd=_PACKAGE_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        if "ready" not in self._reply():
            raise EmulatorError("the wire did not start")
        for ns, address, other in ((self.server_ns, self.server_address, self._client_half),
                                   (self.client_ns, self.client_address, self._server_half)):
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", TUN_NAME, "addrgenmode", "none")  # no IPv6 link-local, no solicitations
            _ip("-n", ns, "addr", "add", f"{address}/32", "dev", TUN_NAME)
            _ip("-n", ns, "link", "set", TUN_NAME, "up")
            _ip("-n", ns, "route", "add", str(other), "dev", TUN_NAME, "src", address)

    def _reply(self) -> dict:
        line = self._wire.stdout.readline()
        if not line:
            raise EmulatorError(f"the wire exited ({self._wire.poll()})")
        return json.loads(line)

    def _ask(self, op: str, **fields) -> dict:
        with self._lock:
            if self._wire is None or self._wire.poll() is not None:
                raise EmulatorError("the emulator is closed")
            self._wire.stdin.write(json.dumps({"op": op, **fields}) + "\n")
            self._wire.stdin.flush()
            reply = self._reply()
        if "error" in reply:
            raise EmulatorError(reply["error"])
        return reply

    # ### The link

    def set_profile(self, profile: str | Profile) -> None:
        """Both directions get this one-way profile (a name from PROFILES, or a Profile)."""
        profile = PROFILES[profile] if isinstance(profile, str) else profile
        self._ask("profile", **dataclasses.asdict(profile))

    def cut(self) -> None:
        """Drop everything both ways, including what is on the wire, until `restore()`."""
        self._ask("cut")

    def restore(self) -> None:
        self._ask("restore")

    def outage(self, seconds: float) -> None:
        """Cut, wait, restore (blocking)."""
        self.cut()
        try:
            time.sleep(seconds)
        finally:
            self.restore()

    async def outage_async(self, seconds: float) -> tuple[float, float]:
        """Cut, wait, restore, without blocking the event loop. Returns the window in which the
        link was surely down (time.monotonic()): from the cut taking effect to the restore's request."""
        await asyncio.to_thread(self.cut)
        cut_at = time.monotonic()
        try:
            await asyncio.sleep(seconds)
        finally:
            restore_at = time.monotonic()
            await asyncio.to_thread(self.restore)
        return cut_at, restore_at

    def block_udp(self, blocked: bool = True) -> None:
        """Drop IPv4 UDP both ways (TCP passes), or let it through again."""
        self._ask("block_udp", blocked=blocked)

    def handover(self) -> str:
        """Move the client to a new address, the source of its route to the server; return it.

        From then on the wire drops every packet from or to the old address, so flows opened
        before the handover die (as when the old network is gone) and new ones work.
        """
        old = self.client_address
        self._handovers += 1
        new = str(self._client_half[1 + self._handovers])
        self._ask("drop_address", address=old)
        _ip("-n", self.client_ns, "addr", "add", f"{new}/32", "dev", TUN_NAME)
        _ip("-n", self.client_ns, "route", "replace", str(self._server_half), "dev", TUN_NAME, "src", new)
        _ip("-n", self.client_ns, "addr", "del", f"{old}/32", "dev", TUN_NAME)
        self.client_address = new
        log.info("handover: the client moved from %s to %s", old, new)
        return new

    def event(self, name: str) -> None:
        """Apply one of EVENTS (blocking for an outage's length)."""
        log.info("network event %s", name)
        if name in ("outage-3s", "outage-10s"):
            self.outage(float(name.removeprefix("outage-").removesuffix("s")))
        elif name == "udp-blocked":
            self.block_udp()
        elif name == "handover":
            self.handover()
        else:
            raise ValueError(f"unknown event {name!r}; known: {', '.join(EVENTS)}")

    def stats(self) -> dict:
        """Per direction ("up": client to server, "down": server to client), packets by fate, and those queued."""
        return self._ask("stats")

    # ### What runs on either side

    def namespace(self, side: str) -> str:
        if side not in SIDES:
            raise ValueError(f"side is one of {SIDES}, not {side!r}")
        return self.server_ns if side == "server" else self.client_ns

    def command(self, side: str, argv: list[str]) -> list[str]:
        """That command line, run in that side's namespace."""
        return ["ip", "netns", "exec", self.namespace(side), *argv]

    def popen(self, side: str, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start a process in that side's namespace; `close()` ends it if it still runs."""
        process = subprocess.Popen(self.command(side, list(argv)), **kwargs)
        self._processes.append(process)
        return process

    def socket(self, side: str, type: int = socketlib.SOCK_STREAM) -> socketlib.socket:
        """An IPv4 socket of this process that lives in that side's namespace."""
        return in_namespace(self.namespace(side), lambda: socketlib.socket(socketlib.AF_INET, type))

    def _browser(self, path: str) -> str:
        wrapper = self._scripts / Path(path).name
        wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {self.client_ns} {path} "$@"\n')
        wrapper.chmod(0o755)
        return str(wrapper)

    def chromium(self, path: str = "/usr/bin/chromium") -> str:
        """A script that runs that browser in the client namespace: Playwright's `executable_path`.

        Playwright drives it over a pipe, so its own connection does not cross the namespaces.
        """
        return self._browser(path)

    def firefox(self, path: str = "/usr/bin/firefox-esr") -> str:
        """The same for Firefox, for a driver that talks to it over a pipe (Playwright's own Firefox build).

        Not for geckodriver (Selenium): it talks Marionette over TCP to the browser's loopback,
        which is the client namespace's, out of its reach.
        """
        return self._browser(path)

    # ### Lifetime

    def close(self) -> None:
        """End what runs on either side and the wire, and remove the namespaces (idempotent)."""
        atexit.unregister(self.close)
        for process in self._processes:
            if process.poll() is None:
                process.terminate()
        for process in self._processes:
            try:
                process.wait(2)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._processes.clear()
        if self._wire is not None:
            self._wire.stdin.close()  # the wire ends at the end of its input
            try:
                self._wire.wait(2)
            except subprocess.TimeoutExpired:
                self._wire.kill()
                self._wire.wait()
            self._wire.stdout.close()
            self._wire = None
        for ns in (self.server_ns, self.client_ns):
            if (_NETNS_DIR / ns).exists():
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(self._scripts, ignore_errors=True)

    def __enter__(self) -> NetworkEmulator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ## Command line


def _run(args: argparse.Namespace) -> int:
    with NetworkEmulator(args.profile, seed=args.seed) as net:
        server = net.popen("server", args.command)
        print(f"server in {net.server_ns} at {net.server_address} ({args.profile}); from the client side:\n"
              f"  ip netns exec {net.client_ns} chromium http://{net.server_address}:PORT/", flush=True)
        timer = threading.Timer(args.at, net.event, [args.event])
        timer.daemon = True
        if args.event:
            timer.start()
        try:
            return server.wait()
        except KeyboardInterrupt:
            return 130
        finally:
            timer.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moshi_engine.bench.netem", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="what", required=True)
    run = commands.add_parser("run", help="run a server command in the server namespace behind an emulated link")
    run.add_argument("--profile", default="4g", choices=PROFILES)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--event", choices=EVENTS)
    run.add_argument("--at", type=float, default=10.0, help="seconds after the start, for --event")
    run.add_argument("command", nargs="+", help="after --: the server command")
    wire = commands.add_parser("wire", help="(internal) the forwarding process the emulator starts")
    wire.add_argument("server_ns")
    wire.add_argument("client_ns")
    wire.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.what == "wire":
        Wire(args.server_ns, args.client_ns, args.seed).serve()
        return 0
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
