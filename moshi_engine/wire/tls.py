"""TLS for a server that browsers on other machines open: a page served over plain http from
anywhere but localhost is not a secure context, and browsers then give it no microphone.

    certificate = self_signed_certificate("0.0.0.0")   # made once, kept, reused
    serve(app, host, port, tls=certificate.files)

`self_signed_certificate` makes a certificate for this machine's names and addresses (those
the server listens on: every interface's for 0.0.0.0) and keeps it, with its key, in a user
cache directory (`$XDG_CACHE_HOME/moshi-voice-chat/tls`, else `~/.cache/...`). A later start
reuses it while it covers every name and address and has a month left; otherwise it makes a
new one. A browser asks once to accept it. A real certificate (`--ssl-certfile` /
`--ssl-keyfile`) needs none of this.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import psutil
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

CERT_NAME = "cert.pem"
KEY_NAME = "key.pem"
VALID_DAYS = 397  # the longest a browser accepts for a public certificate; ours follows suit
RENEW_DAYS = 30  # a certificate with less left is made anew at start
LOOPBACK_NAMES = ("localhost",)
ANY_ADDRESS = ("0.0.0.0", "::", "")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def default_directory() -> Path:
    """Where the certificate and its key are kept between starts."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "moshi-voice-chat" / "tls"


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address the server listens on) is this machine alone."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Certificate:
    """A certificate and key on disk, and what it was made for."""

    certfile: Path
    keyfile: Path
    names: tuple[str, ...]
    addresses: tuple[Address, ...]
    made: bool  # made at this start (False: an earlier start's, reused)

    @property
    def files(self) -> tuple[Path, Path]:
        return self.certfile, self.keyfile


def names_and_addresses(host: str) -> tuple[list[str], list[Address]]:
    """The DNS names and IP addresses browsers may reach a server listening on `host` by:
    localhost and the loopback addresses always, this machine's host names, and `host`'s
    address, or every interface's address when `host` is 0.0.0.0 / ::."""
    names = list(LOOPBACK_NAMES)
    addresses: list[Address] = [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]

    def add_name(name: str) -> None:
        name = name.strip().rstrip(".").lower()
        if name and name not in names:
            try:
                ipaddress.ip_address(name)
            except ValueError:
                names.append(name)
            else:
                add_address(name)

    def add_address(text: str) -> None:
        try:
            address = ipaddress.ip_address(text.split("%")[0])  # no IPv6 zone ids in certificates
        except ValueError:
            return
        if address not in addresses and not address.is_link_local:
            addresses.append(address)

    for name in (socket.gethostname(), socket.getfqdn()):
        add_name(name)
    if host in ANY_ADDRESS:
        for interface in psutil.net_if_addrs().values():
            for entry in interface:
                if entry.family in (socket.AF_INET, socket.AF_INET6):
                    add_address(entry.address)
    else:
        add_name(host)
        try:
            for *_, sockaddr in socket.getaddrinfo(host, None):
                add_address(str(sockaddr[0]))
        except OSError:
            pass
    return names, addresses


def self_signed_certificate(host: str, directory: Path | None = None,
                            now: datetime.datetime | None = None) -> Certificate:
    """A certificate for a server listening on `host`: the one kept in `directory` (default
    `default_directory()`) if it covers `names_and_addresses(host)` and is valid for another
    RENEW_DAYS, else a new self-signed one (and key) written there."""
    directory = directory or default_directory()
    now = now or datetime.datetime.now(datetime.UTC)
    names, addresses = names_and_addresses(host)
    certfile, keyfile = directory / CERT_NAME, directory / KEY_NAME
    kept = _kept(certfile, keyfile)
    if kept is not None:
        covered_names, covered_addresses = _covers(kept)
        fresh = kept.not_valid_after_utc - now > datetime.timedelta(days=RENEW_DAYS)
        if fresh and kept.not_valid_before_utc <= now and set(names) <= covered_names \
                and set(addresses) <= covered_addresses:
            return Certificate(certfile, keyfile, tuple(names), tuple(addresses), made=False)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, names[-1] if len(names) > 1 else names[0]),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Moshi voice chat (self-signed)"),
    ])
    alternative_names = [x509.DNSName(name) for name in names] + [x509.IPAddress(address) for address in addresses]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    key_bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    # The key is readable by its owner alone, from the moment it exists.
    descriptor = os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as out:
        out.write(key_bytes)
    os.chmod(keyfile, 0o600)
    certfile.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    log.info("made a self-signed certificate for %s in %s", ", ".join([*names, *map(str, addresses)]), directory)
    return Certificate(certfile, keyfile, tuple(names), tuple(addresses), made=True)


def _kept(certfile: Path, keyfile: Path) -> x509.Certificate | None:
    """The certificate an earlier start kept, if it and its key are there and readable."""
    try:
        certificate = x509.load_pem_x509_certificate(certfile.read_bytes())
        key = serialization.load_pem_private_key(keyfile.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    if certificate.public_key().public_numbers() != key.public_key().public_numbers():
        return None
    return certificate


def _covers(certificate: x509.Certificate) -> tuple[set[str], set[Address]]:
    try:
        alternative = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set(), set()
    return set(alternative.get_values_for_type(x509.DNSName)), set(alternative.get_values_for_type(x509.IPAddress))


def browser_addresses(certificate: Certificate, port: int) -> list[str]:
    """The https:// addresses to give people, most useful first: this machine's names, then
    its non-loopback addresses, then localhost."""
    hosts = [name for name in certificate.names if name not in LOOPBACK_NAMES]
    hosts += [f"[{address}]" if address.version == 6 else str(address)
              for address in certificate.addresses if not address.is_loopback]
    hosts.append("localhost")
    return [f"https://{host}:{port}/" for host in hosts]
