"""TLS in one place: contexts for the API (server), MQTT and InfluxDB (clients), and a clinic CA.

Every TLS connection the product makes or accepts gets its ``ssl.SSLContext``
here, so the rules are the same everywhere: TLS 1.2 or newer, the system's
default ciphers, and for clients, the server's certificate verified against a
CA file (or the system's store) with its host name checked.

:func:`make_clinic_ca` and :func:`make_server_certificate` (``penctl tls``)
create what a local install needs: a clinic CA whose certificate is installed
on the tablets once, and a server certificate it signs for the controller's
names and addresses. They use the ``cryptography`` library rather than the
``openssl`` command line: no external binary with version-dependent flags,
keys never pass through a shell, and the result is testable in-process.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


class ClientTls(Protocol):
    """What a client TLS section holds (``config.TlsClientSettings`` is one).

    Structural, so this module needs nothing from ``config``, which imports it to
    validate its TLS sections at start.
    """

    @property
    def ca_file(self) -> Path | None: ...
    @property
    def certfile(self) -> Path | None: ...
    @property
    def keyfile(self) -> Path | None: ...
    @property
    def verify(self) -> bool: ...


class TlsError(ValueError):
    """A certificate, key or CA file cannot be used; the message names the file and why."""


def server_context(certfile: Path, keyfile: Path) -> ssl.SSLContext:
    """A server context for ``certfile`` (its chain) and ``keyfile``; TlsError if unusable."""
    for what, path in (("certificate", certfile), ("key", keyfile)):
        if not Path(path).is_file():
            raise TlsError(f"the TLS {what} file {path} does not exist")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(certfile), str(keyfile))
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(
            f"cannot use TLS certificate {certfile} with key {keyfile}: {_reason(exc)}"
        ) from exc
    return context


def client_context(
    ca_file: Path | None = None,
    *,
    certfile: Path | None = None,
    keyfile: Path | None = None,
    verify: bool = True,
) -> ssl.SSLContext:
    """A client context that verifies the server against ``ca_file`` (None: the system's CAs).

    ``certfile``/``keyfile``: a client certificate, for a broker that asks for one.
    ``verify=False`` is for a laboratory only (``verify = false`` in the settings).
    """
    if ca_file is not None and not Path(ca_file).is_file():
        raise TlsError(f"the CA file {ca_file} does not exist")
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(ca_file) if ca_file else None
        )
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"cannot read the CA file {ca_file}: {_reason(exc)}") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if (certfile is None) != (keyfile is None):
        raise TlsError("a client certificate needs both its certificate file and its key file")
    if certfile is not None and keyfile is not None:
        try:
            context.load_cert_chain(str(certfile), str(keyfile))
        except (ssl.SSLError, OSError) as exc:
            raise TlsError(
                f"cannot use client certificate {certfile} with key {keyfile}: {_reason(exc)}"
            ) from exc
    return context


def settings_context(settings: ClientTls | None) -> ssl.SSLContext | None:
    """The client context for a ``[mqtt.tls]`` or ``[influx.tls]`` section (None: no TLS).

    The one function both the MQTT publisher and ingest (and the audit anchor)
    call, so every client verifies its server the same way.
    """
    if settings is None:
        return None
    return client_context(
        settings.ca_file,
        certfile=settings.certfile,
        keyfile=settings.keyfile,
        verify=settings.verify,
    )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


# --- a clinic CA for a local install -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IssuedFiles:
    """Where a certificate and its private key were written."""

    cert: Path
    key: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Created 0600 from the start: the key is never readable by others, even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def make_clinic_ca(directory: Path, clinic: str, *, days: int = 3650) -> IssuedFiles:
    """A new clinic CA (``ca.crt``, ``ca.key``) in ``directory``; refuses to overwrite."""
    directory.mkdir(parents=True, exist_ok=True)
    files = IssuedFiles(directory / "ca.crt", directory / "ca.key")
    for path in (files.cert, files.key):
        if path.exists():
            raise TlsError(f"{path} already exists; remove it first to make a new CA")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, clinic),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{clinic} clinic CA"),
        ]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(files.key, key)
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return files


def make_server_certificate(
    ca: IssuedFiles,
    names: Iterable[str],
    directory: Path,
    *,
    stem: str = "server",
    days: int = 825,
    client: bool = False,
) -> IssuedFiles:
    """A certificate signed by the clinic CA for ``names`` (host names or IP addresses).

    ``client=True`` makes a client certificate instead (an MQTT client's, say).
    825 days: the longest lifetime current browsers accept for a server certificate.
    """
    wanted = [n.strip() for n in names if n.strip()]
    if not wanted:
        raise TlsError("name at least one host name or address for the certificate")
    try:
        ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
        ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise TlsError(f"cannot read the clinic CA ({ca.cert}, {ca.key}): {exc}") from exc
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TlsError(f"{ca.key} is not a key made by penctl tls")
    alt: list[x509.GeneralName] = []
    for name in wanted:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, wanted[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    files = IssuedFiles(directory / f"{stem}.crt", directory / f"{stem}.key")
    _write_key(files.key, key)
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return files
