"""The gateway's certificate authority: one CA per data directory, short-lived mutual-TLS certificates."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from distributed.security import Security

from dash_kernel.files import write_atomic

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

ROLES = ("scheduler", "worker", "client")
CA_LIFETIME = datetime.timedelta(days=3650)
DEFAULT_LIFETIMES = {
    "client": datetime.timedelta(days=7),
    # The scheduler and the gateway's own workers are reissued at every (re)start.
    "scheduler": datetime.timedelta(days=365),
    "worker": datetime.timedelta(days=365),
}
# Tolerate modest clock differences between the gateway and the machines it certifies.
CLOCK_SKEW = datetime.timedelta(minutes=5)
_LOOPBACK_NAMES = ("localhost",)
_LOOPBACK_IPS = ("127.0.0.1", "::1")
_ORGANIZATION = "DASH"
_EC_CURVES = ("secp256r1", "secp384r1", "secp521r1")
_MIN_RSA_BITS = 2048
CertificatePublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


@dataclass(frozen=True)
class Credentials:
    """PEM text of a certificate, its private key and the CA that signed it."""

    role: str
    cert: str
    key: str
    ca: str

    def security(self) -> Security:
        """A Dask ``Security`` for this role: mutual TLS, encryption required."""
        return security_for(self.role, ca=self.ca, cert=self.cert, key=self.key)

    def write(self, directory: str | os.PathLike[str], stem: str) -> tuple[str, str, str]:
        """Write ``<stem>-ca.pem``, ``<stem>.pem`` and ``<stem>-key.pem`` (mode 0600); return the paths."""
        directory = Path(directory)
        _ensure_private_dir(directory)
        paths = (
            directory / f"{stem}-ca.pem",
            directory / f"{stem}.pem",
            directory / f"{stem}-key.pem",
        )
        for path, text in zip(paths, (self.ca, self.cert, self.key), strict=True):
            write_atomic(path, text)
        return str(paths[0]), str(paths[1]), str(paths[2])


def security_for(role: str, *, ca: str, cert: str, key: str) -> Security:
    """Build a mutual-TLS Dask ``Security`` for ``role``; each value is PEM text or a file path."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    return Security(
        require_encryption=True,
        tls_ca_file=ca,
        **{f"tls_{role}_cert": cert, f"tls_{role}_key": key},
    )


class CertificateAuthority:
    """A self-signed EC P-256 CA kept in ``<data_dir>/tls`` (created on first use, reused after).

    ``name`` is the CA's common name when it is created (each user cluster has a CA of its own).
    """

    def __init__(self, directory: str | os.PathLike[str], name: str = "DASH gateway CA"):
        self.directory = Path(directory)
        self.name = name
        self.cert_path = self.directory / "ca.pem"
        self.key_path = self.directory / "ca-key.pem"
        with self._lock():
            if not (self.cert_path.exists() and self.key_path.exists()):
                self._create()
            self._cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
            key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{self.key_path} is not an EC private key")
        self._key = key
        self.cert_pem = self._cert.public_bytes(serialization.Encoding.PEM).decode()

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        # Two gateways sharing a data directory must not each write half of a CA.
        _ensure_private_dir(self.directory)
        if fcntl is None:  # pragma: no cover
            yield
            return
        with open(self.directory / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _create(self) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
                x509.NameAttribute(NameOID.COMMON_NAME, self.name[:64]),
            ]
        )
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        # Key first: a cert without its key would be taken for a complete CA by the next start.
        write_atomic(self.key_path, _key_pem(key))
        write_atomic(self.cert_path, cert.public_bytes(serialization.Encoding.PEM).decode())
        log.info("Created the certificate authority %r in %s", self.name, self.directory)

    def issue(
        self,
        role: str,
        name: str,
        valid_for: datetime.timedelta | None = None,
        hosts: Iterable[str] = (),
    ) -> Credentials:
        """Issue a certificate for ``role`` (scheduler, worker or client) named ``name``.

        The subject is ``O=DASH, OU=<role>, CN=<name>``; the SAN always covers localhost,
        127.0.0.1 and ::1 plus ``hosts`` (IP addresses or DNS names). Clients get a
        client-only certificate; schedulers and workers both serve and connect.
        """
        _check_role(role)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._certificate(role, name, key.public_key(), valid_for, hosts)
        return Credentials(
            role=role,
            cert=cert.public_bytes(serialization.Encoding.PEM).decode(),
            key=_key_pem(key),
            ca=self.cert_pem,
        )

    def sign_csr(
        self,
        csr_pem: str | bytes,
        role: str,
        name: str,
        valid_for: datetime.timedelta | None = None,
        hosts: Iterable[str] = (),
    ) -> tuple[str, int]:
        """Certify the public key of a certificate signing request; return the PEM and its serial.

        Only the CSR's key is used: the subject, SAN and usages are the ones :meth:`issue`
        gives ``role`` and ``name``, whatever the CSR asks for. A CSR whose signature does
        not verify (its maker does not hold the key), or with a weak or unknown kind of key,
        raises ``ValueError``.
        """
        _check_role(role)
        data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
        try:
            csr = x509.load_pem_x509_csr(data)
        except ValueError as exc:
            raise ValueError(f"not a PEM certificate signing request ({exc})") from None
        if not csr.is_signature_valid:
            raise ValueError(
                "the certificate signing request's signature does not verify: "
                "it was not signed with the key it carries"
            )
        public_key = csr.public_key()
        _check_public_key(public_key)
        cert = self._certificate(role, name, public_key, valid_for, hosts)
        return cert.public_bytes(serialization.Encoding.PEM).decode(), cert.serial_number

    def _certificate(
        self,
        role: str,
        name: str,
        public_key: CertificatePublicKey,
        valid_for: datetime.timedelta | None,
        hosts: Iterable[str],
    ) -> x509.Certificate:
        """The one place leaf certificates are built and signed."""
        lifetime = valid_for if valid_for is not None else DEFAULT_LIFETIMES[role]
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                # X.509 caps a common name at 64 characters.
                x509.NameAttribute(NameOID.COMMON_NAME, (name or role)[:64]),
            ]
        )
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if role != "client":
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        is_rsa = isinstance(public_key, rsa.RSAPublicKey)
        now = _now()
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(min(now + lifetime, self._cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    # EC keys agree on session keys (ECDH); RSA keys may encipher them.
                    key_agreement=not is_rsa,
                    key_encipherment=is_rsa,
                    key_cert_sign=False,
                    crl_sign=False,
                    content_commitment=False,
                    data_encipherment=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectAlternativeName(_san(hosts)), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")


def _check_public_key(key: object) -> None:
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in _EC_CURVES:
            raise ValueError(
                f"unsupported elliptic curve {key.curve.name}; use one of {', '.join(_EC_CURVES)}"
            )
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise ValueError(f"RSA key of {key.key_size} bits; at least {_MIN_RSA_BITS} are needed")
    else:
        raise ValueError(f"unsupported key type {type(key).__name__}; use an EC (P-256) or RSA key")


def _san(hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in (*_LOOPBACK_NAMES, *_LOOPBACK_IPS, *hosts):
        host = host.strip().strip("[]")
        if not host or host in seen or host in ("0.0.0.0", "::"):
            continue
        seen.add(host)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _ensure_private_dir(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
