"""Real peers for tests: pebble, certbot and Prosody under private configs.

Each peer is a context manager that starts a real process bound to
127.0.0.1 only, in a temporary directory of its own, and stops it by its
pid on exit. Tests needing them call `require_binaries` first, which skips
when a tool is missing, or fails when CI=true.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import grp
import ipaddress
import json
import os
import pwd
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Self

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from types import TracebackType

PROSODY_USER = "prosody"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
_PROXY_VARIABLES = (
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
)


class PeerError(Exception):
    """A peer did not start, or did not do what it was asked."""


def require_binaries(*names: str) -> None:
    """Skip the calling test unless every named program is on PATH.

    With CI=true a missing program fails the test instead, so that a
    broken CI image cannot pass by skipping.
    """
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        _unavailable(f"not on PATH: {' '.join(missing)}")


def require_root() -> None:
    """Skip the calling test unless it runs as root with a prosody user.

    Follows the same CI=true rule as `require_binaries`.
    """
    if os.geteuid() != 0:
        _unavailable("needs root to chown and to switch to the prosody user")
    try:
        pwd.getpwnam(PROSODY_USER)
    except KeyError:
        _unavailable(f"user {PROSODY_USER!r} does not exist")


def _unavailable(reason: str) -> None:
    """Skip, or fail under CI, with `reason`."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true forbids skipping)", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def wait_for(
    predicate: Callable[[], bool], timeout: float, what: str
) -> float:
    """Poll `predicate` until it holds; return the seconds it took.

    Raises PeerError naming `what` when `timeout` passes first.
    """
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            msg = f"{what}: not reached within {timeout} s"
            raise PeerError(msg)
        time.sleep(0.05)
    return time.monotonic() - start


def is_listening(port: int) -> bool:
    """Say whether something accepts TCP connections on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def self_signed(
    names: Sequence[str],
    *,
    ip: str | None = None,
    days: int = 30,
) -> tuple[bytes, bytes]:
    """Return (certificate PEM, key PEM) of a self-signed EC certificate.

    The first name is the subject CN; all names, and `ip` if given, are
    in the subjectAltName.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    if ip is not None:
        alt_names.append(x509.IPAddress(ipaddress.ip_address(ip)))

    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .sign(key, hashes.SHA256())
    )

    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _issue_tls_pair(directory: Path) -> tuple[Path, Path, Path]:
    """Write a throwaway CA and a server pair for IP 127.0.0.1.

    Returns the paths of the CA certificate, server certificate and key.
    """
    now = dt.datetime.now(dt.UTC)
    lifetime = dt.timedelta(days=2)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "throwaway test CA")]
    )
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + lifetime)
        .add_extension(
            x509.BasicConstraints(ca=True, path_length=0), critical=True
        )
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
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
        )
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + lifetime)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.DNSName("localhost"),
                ]
            ),
            critical=False,
        )
        .add_extension(
            x509.BasicConstraints(ca=False, path_length=None), critical=True
        )
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    ca_path = directory / "ca.pem"
    cert_path = directory / "server.pem"
    key_path = directory / "server.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_path, cert_path, key_path


def _clean_env(**overrides: str) -> dict[str, str]:
    """Return this process's environment without proxies, plus overrides."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in _PROXY_VARIABLES
    }
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update(overrides)
    return env


def _tail(path: Path, lines: int = 30) -> str:
    """Return the last lines of a log file, or a note that it is missing."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:])


def catches_signal(pid: int, signum: int) -> bool:
    """Say whether process `pid` has a handler installed for `signum`."""
    status = Path(f"/proc/{pid}/status").read_text()
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate `process` by its pid and reap it; kill it if it lingers."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=STOP_TIMEOUT)


def _start(
    argv: list[str], log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start `argv` with its output in `log`, detached from our stdin."""
    with log.open("ab") as output:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
        )


class Pebble:
    """A pebble ACME server on free loopback ports, with its own TLS CA.

    Every challenge is accepted (PEBBLE_VA_ALWAYS_VALID) and no nonce is
    rejected, so certbot needs no challenge responder and never retries.
    """

    def __init__(self, validity: int = 90 * 86400) -> None:
        self.validity = validity
        self.port = free_port()
        self.management_port = free_port()
        self._exit = contextlib.ExitStack()
        self._process: subprocess.Popen[bytes] | None = None
        self.directory = Path()

    @property
    def directory_url(self) -> str:
        """The ACME directory, for certbot's --server."""
        return f"https://127.0.0.1:{self.port}/dir"

    @property
    def tls_ca_path(self) -> Path:
        """The CA of pebble's own TLS certificate, for REQUESTS_CA_BUNDLE."""
        return self.directory / "ca.pem"

    def issuing_roots_pem(self) -> str:
        """Return the PEM of the root that signs this run's certificates."""
        return self._management_get("/roots/0")

    def intermediates_pem(self) -> str:
        """Return the PEM of the intermediate certbot puts in chain.pem."""
        return self._management_get("/intermediates/0")

    def __enter__(self) -> Self:
        try:
            self._exit.enter_context(self._started())
        except BaseException:
            self._exit.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._exit.close()

    @contextlib.contextmanager
    def _started(self) -> Iterator[None]:
        """Write the CA and config, run pebble, wait until it answers."""
        with tempfile.TemporaryDirectory(prefix="pebble-") as tmp:
            self.directory = Path(tmp)
            _, cert, key = _issue_tls_pair(self.directory)
            config = self.directory / "pebble.json"
            config.write_text(
                json.dumps(
                    {
                        "pebble": {
                            "listenAddress": f"127.0.0.1:{self.port}",
                            "managementListenAddress": (
                                f"127.0.0.1:{self.management_port}"
                            ),
                            "certificate": str(cert),
                            "privateKey": str(key),
                            "httpPort": free_port(),
                            "tlsPort": free_port(),
                            "ocspResponderURL": "",
                            "externalAccountBindingRequired": False,
                            "certificateValidityPeriod": self.validity,
                        }
                    }
                )
            )

            log = self.directory / "pebble.log"
            env = _clean_env(
                PEBBLE_VA_ALWAYS_VALID="1",
                PEBBLE_VA_NOSLEEP="1",
                PEBBLE_WFE_NONCEREJECT="0",
            )
            argv = ["pebble", "-config", str(config)]
            argv += ["-dnsserver", "127.0.0.1:1053"]
            self._process = _start(argv, log, env)
            try:
                self._wait_until_ready(log)
                yield
            finally:
                _stop(self._process)

    def _wait_until_ready(self, log: Path) -> None:
        """Return once the directory answers; raise if pebble died."""

        def is_ready() -> bool:
            if self._process is not None and self._process.poll() is not None:
                msg = f"pebble exited early:\n{_tail(log)}"
                raise PeerError(msg)
            try:
                self._get(self.directory_url)
            except OSError:
                return False
            return True

        wait_for(is_ready, START_TIMEOUT, "pebble answering")

    def _management_get(self, path: str) -> str:
        """GET a path of the management interface, as text."""
        return self._get(f"https://127.0.0.1:{self.management_port}{path}")

    def _get(self, url: str) -> str:
        """GET `url` trusting only our CA and bypassing any proxy."""
        context = ssl.create_default_context(cafile=self.tls_ca_path)
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}),
            urllib.request.HTTPSHandler(context=context),
        )
        with opener.open(url, timeout=5) as response:
            body: bytes = response.read()
        return body.decode()


class Certbot:
    """certbot against a Pebble, with private config, work and log dirs."""

    def __init__(self, pebble: Pebble, timeout: float = 120.0) -> None:
        self.pebble = pebble
        self.timeout = timeout
        self._exit = contextlib.ExitStack()
        self.root = Path()

    @property
    def config_dir(self) -> Path:
        """The --config-dir; lineages are under its live/."""
        return self.root / "config"

    def __enter__(self) -> Self:
        tmp = self._exit.enter_context(
            tempfile.TemporaryDirectory(prefix="certbot-")
        )
        self.root = Path(tmp)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._exit.close()

    def certonly(
        self, names: Sequence[str], cert_name: str | None = None
    ) -> Path:
        """Obtain one certificate for `names`; return its live directory."""
        args = ["certonly", "--agree-tos", "--register-unsafely-without-email"]
        args += ["--manual", "--preferred-challenges", "http"]
        args += ["--manual-auth-hook", "/bin/true"]
        if cert_name is not None:
            args += ["--cert-name", cert_name]
        for name in names:
            args += ["-d", name]
        self._run(args)

        return self.config_dir / "live" / (cert_name or names[0])

    def renew(self, force: bool = True) -> None:
        """Renew every lineage, all of them at once when `force` is set."""
        args = ["renew", "--no-random-sleep-on-renew"]
        if force:
            args.append("--force-renewal")
        self._run(args)

    def _run(self, args: list[str]) -> str:
        """Run certbot with the private dirs; raise with its output."""
        argv = ["certbot", *args, "--non-interactive"]
        argv += ["--server", self.pebble.directory_url]
        argv += ["--config-dir", str(self.config_dir)]
        argv += ["--work-dir", str(self.root / "work")]
        argv += ["--logs-dir", str(self.root / "logs")]
        bundle = str(self.pebble.tls_ca_path)
        env = _clean_env(REQUESTS_CA_BUNDLE=bundle, CURL_CA_BUNDLE=bundle)

        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=env,
            timeout=self.timeout,
            check=False,
        )
        output = done.stdout + done.stderr
        if done.returncode != 0:
            msg = f"certbot {args[0]} exited {done.returncode}:\n{output}"
            raise PeerError(msg)
        return output


def install_pair(
    certs_dir: Path, name: str, fullchain: bytes, key: bytes
) -> tuple[Path, Path]:
    """Write `<name>.crt` (0644) and `<name>.key` (0640), root:prosody.

    Returns both paths. Prosody reads them at its next start or reload.
    """
    gid = grp.getgrnam(PROSODY_USER).gr_gid
    written = []
    for suffix, data, mode in (
        (".crt", fullchain, 0o644),
        (".key", key, 0o640),
    ):
        path = certs_dir / f"{name}{suffix}"
        path.write_bytes(data)
        os.chown(path, 0, gid)
        path.chmod(mode)
        written.append(path)
    return written[0], written[1]


@contextlib.contextmanager
def prosody_certs_dir() -> Iterator[Path]:
    """Yield a fresh certificate directory the prosody user can read.

    pytest's tmp_path sits below a 0700 directory, out of Prosody's reach,
    so this one lives in a world-searchable temporary directory.
    """
    with tempfile.TemporaryDirectory(prefix="prosody-certs-") as tmp:
        top = Path(tmp)
        top.chmod(0o755)
        certs = top / "certs"
        certs.mkdir()
        os.chown(certs, 0, grp.getgrnam(PROSODY_USER).gr_gid)
        certs.chmod(0o750)
        yield certs


def _lua_string(value: str) -> str:
    """Quote `value` for a Lua config; refuse what would need escapes."""
    if any(char in value for char in '"\\\n\r') or not value.isascii():
        msg = f"{value!r} cannot be written as a plain Lua string"
        raise PeerError(msg)
    return f'"{value}"'


def _reachable_by(directory: Path, uid: int, gids: set[int]) -> bool:
    """Say whether a process with `uid` and `gids` can enter `directory`."""
    for part in (directory, *directory.parents):
        info = part.stat()
        if info.st_uid == uid:
            allowed = info.st_mode & stat.S_IXUSR
        elif info.st_gid in gids:
            allowed = info.st_mode & stat.S_IXGRP
        else:
            allowed = info.st_mode & stat.S_IXOTH
        if not allowed:
            return False
    return True


class Prosody:
    """Prosody under a private config, running as the prosody user.

    Serves VirtualHost example.test and the MUC component
    conference.example.test on free c2s and s2s ports of 127.0.0.1, with
    certificates from `certs_dir`. No outgoing connection is ever made.
    """

    def __init__(
        self,
        certs_dir: Path,
        *,
        host: str = "example.test",
        component: str = "conference.example.test",
        log_level: str = "info",
    ) -> None:
        self.certs_dir = certs_dir.resolve()
        self.host = host
        self.component = component
        self.log_level = log_level
        self.c2s_port = free_port()
        self.s2s_port = free_port()
        self.root = Path()
        self._exit = contextlib.ExitStack()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        """The private config file passed with --config."""
        return self.root / "prosody.cfg.lua"

    @property
    def pidfile(self) -> Path:
        """The pidfile Prosody writes, as `prosodyctl reload` reads it."""
        return self.root / "run" / "prosody.pid"

    @property
    def log_path(self) -> Path:
        """Prosody's log file."""
        return self.root / "run" / "prosody.log"

    @property
    def pid(self) -> int:
        """The pid of the running Prosody."""
        if self._process is None:
            msg = "prosody is not running"
            raise PeerError(msg)
        return self._process.pid

    def reload(self) -> None:
        """Send SIGHUP, as `prosodyctl reload` would."""
        os.kill(self.pid, signal.SIGHUP)

    def check_certs(self) -> tuple[int, str]:
        """Run `prosodyctl check certs`; return its exit code and output."""
        done = subprocess.run(
            [
                "prosodyctl",
                "--root",
                "--config",
                str(self.config_path),
                "check",
                "certs",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return done.returncode, done.stdout + done.stderr

    def log_text(self) -> str:
        """Return everything Prosody has logged so far."""
        return self.log_path.read_text(errors="replace")

    def __enter__(self) -> Self:
        try:
            self._exit.enter_context(self._started())
        except BaseException:
            self._exit.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._exit.close()

    @contextlib.contextmanager
    def _started(self) -> Iterator[None]:
        """Lay out the private tree, run Prosody, wait for its c2s port."""
        user = pwd.getpwnam(PROSODY_USER)
        gids = {user.pw_gid, *os.getgrouplist(PROSODY_USER, user.pw_gid)}
        if not _reachable_by(self.certs_dir, user.pw_uid, gids):
            msg = (
                f"{self.certs_dir} is out of reach of user {PROSODY_USER}"
                " (a parent directory is not searchable)"
            )
            raise PeerError(msg)

        with tempfile.TemporaryDirectory(prefix="prosody-") as tmp:
            self.root = Path(tmp)
            os.chown(self.root, 0, user.pw_gid)
            self.root.chmod(0o750)
            for name in ("data", "run"):
                (self.root / name).mkdir(mode=0o750)
                os.chown(self.root / name, user.pw_uid, user.pw_gid)
            self.config_path.write_text(self._config())
            os.chown(self.config_path, 0, user.pw_gid)
            self.config_path.chmod(0o640)

            argv = ["setpriv", f"--reuid={PROSODY_USER}"]
            argv += [f"--regid={PROSODY_USER}", "--init-groups"]
            argv += ["prosody", "--config", str(self.config_path), "-F"]
            console = self.root / "console.log"
            self._process = _start(argv, console)
            try:
                self._wait_until_ready(console)
                yield
            finally:
                _stop(self._process)
                self._process = None

    def _wait_until_ready(self, console: Path) -> None:
        """Return once c2s accepts and SIGHUP would reload, not kill.

        Prosody 0.12 writes its pidfile and opens its ports before it
        installs its signal handlers, on the first turn of its event loop;
        a SIGHUP in between kills it.
        """

        def is_ready() -> bool:
            if self._process is not None and self._process.poll() is not None:
                msg = (
                    f"prosody exited early:\n{_tail(console)}\n"
                    f"{_tail(self.log_path)}"
                )
                raise PeerError(msg)
            try:
                written = self.pidfile.read_text().strip()
            except FileNotFoundError:
                return False
            return (
                written == str(self.pid)
                and is_listening(self.c2s_port)
                and catches_signal(self.pid, signal.SIGHUP)
            )

        wait_for(is_ready, START_TIMEOUT, "prosody accepting on c2s")

    def _config(self) -> str:
        """Return the Lua config of this instance."""
        return f"""\
pidfile = {_lua_string(str(self.pidfile))}
data_path = {_lua_string(str(self.root / "data"))}
log = {{
    {{ levels = {{ min = {_lua_string(self.log_level)} }};
      to = "file"; filename = {_lua_string(str(self.log_path))} }};
}}
interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {self.c2s_port} }}
s2s_ports = {{ {self.s2s_port} }}
c2s_direct_tls_ports = {{ }}
s2s_direct_tls_ports = {{ }}
legacy_ssl_ports = {{ }}
certificates = {_lua_string(str(self.certs_dir))}
modules_enabled = {{ "tls"; "saslauth"; "dialback"; "disco"; "ping" }}
modules_disabled = {{ }}
plugin_paths = {{ }}
authentication = "internal_hashed"
storage = "internal"
s2s_secure_auth = false

VirtualHost {_lua_string(self.host)}

Component {_lua_string(self.component)} "muc"
"""
