"""Production settings for CesaFlow processes started on loopback by the benchmark (``bench/``), the deployment drill
(``deploy/drill.py``) and the deployment tests (``tests/deploy``): fresh secrets on every call, never written
anywhere or reused, and nothing of the caller's own ``CESAFLOW_*`` environment; and the TLS proxy in front of them
(``throwaway_tls``: a throwaway CA and certificate; ``caddy_env``: what deploy/proxy/Caddyfile reads)."""

from __future__ import annotations

import base64
import datetime
import glob
import ipaddress
import os
import secrets
import shutil
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# The TLS proxy (Caddy with deploy/proxy/Caddyfile) in front of the web processes: its site name, which the
# throwaway certificate carries and the web processes allow (CESAFLOW_ALLOWED_HOSTS).
CADDYFILE = ROOT / "deploy" / "proxy" / "Caddyfile"
SITE_HOST = "localhost"


def free_port(host: str = HOST) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def random_keyring() -> str:
    """A one-key ring in ``CESAFLOW_KEYRING`` / ``CESAFLOW_SESSION_KEYS`` form."""
    return "1:" + base64.b64encode(secrets.token_bytes(32)).decode()


def production_env(
    *,
    workdir: Path,
    database_url: str,
    redis_url: str,
    allowed_hosts: str = HOST,
    keyring: str | None = None,
    channel_layer_key: str | None = None,
    behind_tls_proxy: bool = False,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of a production CesaFlow process on loopback. ``behind_tls_proxy``: it trusts the proxy's
    ``X-Forwarded-For`` and keeps production's HTTPS redirect; otherwise it serves plain HTTP to its clients.
    ``keyring`` / ``channel_layer_key``: to share the caller's (a test that reads what the process wrote)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "HOME": str(workdir),
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
        "DJANGO_SETTINGS_MODULE": "cesaflow.settings",
        "CESAFLOW_ENV": "production",
        "CESAFLOW_SECRET_KEY": secrets.token_urlsafe(50),
        "CESAFLOW_ALLOWED_HOSTS": allowed_hosts,
        "CESAFLOW_KEYRING": keyring or random_keyring(),
        "CESAFLOW_SESSION_KEYS": random_keyring(),
        "CESAFLOW_CHANNEL_LAYER_KEY": channel_layer_key or secrets.token_urlsafe(32),
        # The provider simulator lives on loopback, which production refuses by default.
        "CESAFLOW_PROVIDER_HOST_ALLOWLIST": HOST,
        "CESAFLOW_VAR_DIR": str(workdir / "var"),
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
    }
    if behind_tls_proxy:
        env["CESAFLOW_TRUST_X_FORWARDED_FOR"] = "true"
    else:
        env["CESAFLOW_SSL_REDIRECT"] = "false"
        env["CESAFLOW_TRUST_X_FORWARDED_FOR"] = "false"  # clients connect directly (and check --deploy agrees)
    env.update(extra or {})
    return env


@dataclass(frozen=True)
class TLSFiles:
    ca: Path  # the CA certificate clients trust
    cert: Path  # the server's certificate (for localhost and 127.0.0.1)
    key: Path  # its private key


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def throwaway_tls(directory: Path) -> TLSFiles:
    """A CA and a one-day certificate for ``localhost`` / 127.0.0.1 signed by it (P-256 keys)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "CesaFlow test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SITE_HOST)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(SITE_HOST), x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    files = TLSFiles(ca=directory / "ca.pem", cert=directory / "cert.pem", key=directory / "key.pem")
    files.ca.write_bytes(_pem(ca))
    files.cert.write_bytes(_pem(cert))
    fd = os.open(files.key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return files


def caddy_env(*, port: int, tls: TLSFiles, upstreams: list[int], static_root: Path, home: Path) -> dict[str, str]:
    """Exactly what deploy/proxy/Caddyfile reads, plus a HOME and XDG directories of the caller's own."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / "config"),
        "XDG_DATA_HOME": str(home / "data"),
        "TMPDIR": str(home / "tmp"),
        "CADDY_SITE": f"https://{SITE_HOST}:{port}",
        "CADDY_BIND": "127.0.0.1",
        "CADDY_TLS_CERT": str(tls.cert),
        "CADDY_TLS_KEY": str(tls.key),
        "CADDY_UPSTREAMS": " ".join(f"127.0.0.1:{upstream}" for upstream in upstreams),
        "CADDY_STATIC_ROOT": str(static_root),
    }


def postgres_cluster(data: Path) -> tuple[list[str], Path]:
    """A new, empty PostgreSQL cluster in ``data`` (trust authentication, superuser ``postgres``), from the installed
    binaries; returns the command prefix to run its server as (``runuser -u postgres --`` when we are root: initdb
    and postgres refuse root) and the binaries' directory. The caller runs ``postgres`` in the foreground as its
    own child, so the server dies with it."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    initdb = shutil.which("initdb") or (candidates[-1] if candidates else None)
    if initdb is None:
        raise RuntimeError("No initdb found: install PostgreSQL (Debian: apt-get install postgresql).")
    bindir = Path(initdb).parent
    run_as: list[str] = []
    if os.geteuid() == 0:
        run_as = ["runuser", "-u", "postgres", "--"]
        data.parent.chmod(0o711)  # the postgres user must reach its data directory
        data.mkdir(mode=0o700)
        shutil.chown(data, user="postgres")
    initialized = subprocess.run(  # noqa: S603 - the installed initdb, fixed arguments
        [*run_as, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if initialized.returncode != 0:
        raise RuntimeError(f"initdb failed:\n{initialized.stderr[-2000:]}")
    return run_as, bindir


@dataclass
class Child:
    """A process the benchmark or the drill started, with its log."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive:
            self.process.send_signal(signum)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``."""
        if not self.alive:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError(f"no VmRSS for {self.name}")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process (all its threads) so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
