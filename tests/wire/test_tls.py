"""`--https`: a self-signed certificate for this machine's names and addresses, made once, kept
and reused, that a real TLS server serves and a client that trusts it verifies."""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import ssl
import stat
import urllib.request

import psutil
from cryptography import x509
from fastapi import FastAPI

from moshi_engine.web import announce
from moshi_engine.wire.tls import browser_addresses, is_loopback, self_signed_certificate
from tests.live import serve_asgi


def alternative_names(certfile) -> tuple[set[str], set]:
    certificate = x509.load_pem_x509_certificate(certfile.read_bytes())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(names.get_values_for_type(x509.DNSName)), set(names.get_values_for_type(x509.IPAddress))


def interface_addresses() -> set:
    found = set()
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            if entry.family in (socket.AF_INET, socket.AF_INET6):
                address = ipaddress.ip_address(entry.address.split("%")[0])
                if not address.is_link_local:
                    found.add(address)
    return found


def test_a_certificate_for_every_address_names_this_machine_and_each_of_its_addresses(tmp_path):
    certificate = self_signed_certificate("0.0.0.0", tmp_path)
    names, addresses = alternative_names(certificate.certfile)
    assert {"localhost", socket.gethostname().lower()} <= names
    assert {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")} | interface_addresses() <= addresses
    assert certificate.made
    assert stat.S_IMODE(certificate.keyfile.stat().st_mode) == 0o600  # the key is its owner's alone


def test_the_kept_certificate_is_reused_while_it_covers_the_names_and_has_time_left(tmp_path):
    first = self_signed_certificate("0.0.0.0", tmp_path)
    kept = first.certfile.read_bytes(), first.keyfile.read_bytes()
    again = self_signed_certificate("0.0.0.0", tmp_path)
    assert not again.made and (again.certfile.read_bytes(), again.keyfile.read_bytes()) == kept
    # a name it does not cover yet: a new one, for that name too
    named = self_signed_certificate("gpubox.example", tmp_path)
    assert named.made and "gpubox.example" in alternative_names(named.certfile)[0]
    # a month before it expires: made anew
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=380)
    assert self_signed_certificate("gpubox.example", tmp_path, now=later).made


def test_a_broken_or_mismatched_kept_pair_is_replaced(tmp_path):
    first = self_signed_certificate("127.0.0.1", tmp_path)
    other = self_signed_certificate("127.0.0.1", tmp_path / "other")
    first.keyfile.write_bytes(other.keyfile.read_bytes())  # a key that is not the certificate's
    assert self_signed_certificate("127.0.0.1", tmp_path).made
    first.certfile.write_text("not a certificate")
    assert self_signed_certificate("127.0.0.1", tmp_path).made


def test_a_server_serves_it_and_a_client_that_trusts_it_verifies_it_by_name_and_address(tmp_path):
    certificate = self_signed_certificate("0.0.0.0", tmp_path)
    app = FastAPI()
    app.get("/status")(lambda: {"status": "ready"})
    trusting = ssl.create_default_context(cafile=str(certificate.certfile))
    with serve_asgi(app, tls=certificate.files) as url:
        assert url.startswith("https://")
        for base in (url, url.replace("127.0.0.1", "localhost")):
            with urllib.request.urlopen(base + "/status", context=trusting, timeout=10) as response:
                assert json.load(response) == {"status": "ready"}


def test_the_log_says_where_to_open_the_page_and_warns_of_plain_http_off_this_machine(tmp_path):
    certificate = self_signed_certificate("0.0.0.0", tmp_path)
    lines = announce("0.0.0.0", 7860, certificate)
    addresses = browser_addresses(certificate, 7860)
    assert lines[0][1].startswith(f"Moshi voice chat at {addresses[0]} (also ")
    assert addresses[-1] == "https://localhost:7860/" and all(address in lines[0][1] for address in addresses)
    assert "self-signed" in lines[1][1] and "accept it" in lines[1][1]
    warning = announce("0.0.0.0", 7860)[-1]
    assert warning[0] >= 30 and "no microphone" in warning[1]
    for way_out in ("--https", "--share", "ssh -L 7860:localhost:7860"):
        assert way_out in warning[1]
    quiet = [announce("127.0.0.1", 7860), announce("0.0.0.0", 7860, share=True),
             announce("0.0.0.0", 7860, behind_https=True), announce("0.0.0.0", 7860, certificate.files)]
    assert all(level < 30 for lines in quiet for level, _ in lines)
    assert is_loopback("localhost") and is_loopback("::1") and not is_loopback("0.0.0.0")
