"""The gateway's certificate authority: created once, private files, correct certificates."""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dash_gateway.tls import CertificateAuthority


def _subject(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str:
    return cert.subject.get_attributes_for_oid(oid)[0].value


def test_ca_is_created_once_with_private_files(tmp_path) -> None:
    first = CertificateAuthority(tmp_path / "tls")
    again = CertificateAuthority(tmp_path / "tls")
    assert first.cert_pem == again.cert_pem
    assert stat.S_IMODE((tmp_path / "tls").stat().st_mode) == 0o700
    for name in ("ca.pem", "ca-key.pem"):
        assert stat.S_IMODE((tmp_path / "tls" / name).stat().st_mode) == 0o600


@pytest.mark.parametrize("role", ["scheduler", "worker", "client"])
def test_issued_certificates(tmp_path, role: str) -> None:
    ca = CertificateAuthority(tmp_path / "tls")
    creds = ca.issue(role, "alice", hosts=["10.1.2.3", "node.example"])
    cert = x509.load_pem_x509_certificate(creds.cert.encode())
    ca_cert = x509.load_pem_x509_certificate(creds.ca.encode())
    cert.verify_directly_issued_by(ca_cert)
    assert _subject(cert, NameOID.ORGANIZATIONAL_UNIT_NAME) == role
    assert _subject(cert, NameOID.COMMON_NAME) == "alice"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "node.example"} <= set(san.get_values_for_type(x509.DNSName))
    ips = set(san.get_values_for_type(x509.IPAddress))
    assert {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.1.2.3")} <= ips
    usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert ExtendedKeyUsageOID.CLIENT_AUTH in usages
    assert (ExtendedKeyUsageOID.SERVER_AUTH in usages) == (role != "client")
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    if role == "client":
        assert lifetime <= datetime.timedelta(days=7, minutes=5)
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_credentials_files_are_private(tmp_path) -> None:
    creds = CertificateAuthority(tmp_path / "tls").issue("worker", "w")
    paths = creds.write(tmp_path / "run", "worker")
    for path in paths:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert Path(paths[2]).read_text() == creds.key


def test_unknown_role_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown role"):
        CertificateAuthority(tmp_path / "tls").issue("admin", "x")
