"""The per-machine credential store: the machine token, the cluster CA, the worker key and certificate.

One directory (mode 0700) per enrolled machine, each file mode 0600:

- ``machine.json``: gateway URL, machine name, owner, machine token, caps, declared GPUs,
  worker options;
- ``ca.pem``: the cluster's certificate authority, as the gateway sent it at enrolment;
- ``worker.pem``: the workers' private key and certificate in one file, made at each start.
  The key is generated here and never leaves the machine: the gateway sees only a CSR.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import platformdirs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dash_kernel.files import write_atomic

__all__ = [
    "CONFIG_DIR_ENV",
    "CredentialStore",
    "MachineConfig",
    "default_config_dir",
    "new_key_and_csr",
]

CONFIG_DIR_ENV = "DASH_WORKER_CONFIG_DIR"
MACHINE_FILE = "machine.json"
CA_FILE = "ca.pem"
WORKER_FILE = "worker.pem"
DIR_MODE = 0o700
FILE_MODE = 0o600


def default_config_dir() -> Path:
    """``$DASH_WORKER_CONFIG_DIR``, else ``<user config dir>/dash/worker``."""
    env = os.environ.get(CONFIG_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_config_dir("dash")) / "worker"


@dataclass
class MachineConfig:
    """What ``machine.json`` holds: everything ``dash-worker start`` needs."""

    gateway: str
    name: str
    owner: str
    machine_token: str
    caps: dict[str, Any]
    declared_gpus: list[dict[str, Any]] = field(default_factory=list)
    # Index (as a string) -> what identifies that GPU at the next start (plan.gpu_identities).
    gpu_identities: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MachineConfig:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def new_key_and_csr(common_name: str) -> tuple[str, str]:
    """A fresh EC P-256 private key and a CSR for it, both PEM.

    The subject is only informative: the gateway signs the key with its own subject.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "DASH"),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "worker"),
                    x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                ]
            )
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return key_pem, csr.public_bytes(serialization.Encoding.PEM).decode()


class CredentialStore:
    """The credential directory of one machine."""

    def __init__(self, directory: str | os.PathLike[str] | None = None):
        self.directory = Path(directory).expanduser() if directory else default_config_dir()

    @property
    def machine_file(self) -> Path:
        return self.directory / MACHINE_FILE

    @property
    def ca_file(self) -> Path:
        return self.directory / CA_FILE

    @property
    def worker_file(self) -> Path:
        return self.directory / WORKER_FILE

    def exists(self) -> bool:
        return self.machine_file.exists()

    def load(self) -> MachineConfig:
        """The stored machine; FileNotFoundError if this directory holds none."""
        return MachineConfig.from_json(json.loads(self.machine_file.read_text()))

    def save(self, config: MachineConfig, ca: str | None = None) -> None:
        """Write ``machine.json`` (and ``ca.pem`` when given)."""
        if ca is not None:
            self._write(self.ca_file, ca)
        self._write(self.machine_file, json.dumps(asdict(config), indent=2) + "\n")

    def write_ca(self, ca: str) -> None:
        self._write(self.ca_file, ca)

    def write_worker_credentials(self, key_pem: str, cert_pem: str) -> Path:
        """Replace ``worker.pem`` with this key and certificate; returns its path.

        One file, replaced atomically: running workers re-read it for each new connection,
        and must never see a new certificate beside an old key.
        """
        self._write(self.worker_file, key_pem.rstrip("\n") + "\n" + cert_pem)
        return self.worker_file

    def remove(self) -> None:
        """Delete the whole credential directory."""
        shutil.rmtree(self.directory, ignore_errors=True)

    def _ensure_dir(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        # mkdir's mode is filtered by the umask, and an existing directory keeps its own.
        os.chmod(self.directory, DIR_MODE)

    def _write(self, path: Path, text: str) -> None:
        self._ensure_dir()
        write_atomic(path, text, FILE_MODE)
