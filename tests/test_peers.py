"""The real peers, and fetch_served_leaf against them and against fakes."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from typing import TYPE_CHECKING, Self

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certwatchd.verify import MAX_PREAMBLE, VerifyError, fetch_served_leaf
from peers import (
    Certbot,
    Pebble,
    Prosody,
    free_port,
    install_pair,
    prosody_certs_dir,
    require_binaries,
    require_root,
    self_signed,
    wait_for,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

HOST = "example.test"
COMPONENT = "conference.example.test"
STREAMS = b"xmlns:stream='http://etherx.jabber.org/streams'>"
FEATURES_TLS = (
    b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'>"
    b"<required/></starttls></stream:features>"
)
PROCEED = b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"


def der_of(pem: bytes) -> bytes:
    """Return the DER of the first certificate in `pem`."""
    cert = x509.load_pem_x509_certificate(pem)
    return cert.public_bytes(serialization.Encoding.DER)


def served(port, host, mode="xmpp-client"):
    """Return the leaf the local Prosody serves for `host`."""
    return fetch_served_leaf(host, "127.0.0.1", port, mode, 5)


def serves(port, host, leaf, mode="xmpp-client"):
    """Say whether `leaf` is served for `host`; False while none is."""
    try:
        return served(port, host, mode) == leaf
    except VerifyError:
        return False


# Fakes ---------------------------------------------------------------------


class FakeServer:
    """Accept one connection on 127.0.0.1 and run `script` on it.

    Socket errors in the script are the client hanging up and are ignored;
    anything else is raised again when the server is left.
    """

    def __init__(self, script: Callable[[socket.socket], None]) -> None:
        self.script = script
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(10)
        self.port: int = self.listener.getsockname()[1]
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.thread.join(timeout=10)
        self.listener.close()
        if self.failure is not None:
            raise self.failure

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(10)
                self.script(conn)
        except OSError:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.failure = exc


def read_until(conn: socket.socket, marker: bytes) -> bytes:
    """Read from `conn` until `marker` has arrived; return all of it."""
    data = b""
    while marker not in data:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def wait_for_hangup(conn: socket.socket) -> None:
    """Block until the client closes its end."""
    while conn.recv(4096):
        pass


def open_stream(conn: socket.socket, features: bytes) -> bytes:
    """Answer the client's stream header; return that header."""
    header = read_until(conn, STREAMS)
    conn.sendall(
        b"<?xml version='1.0'?><stream:stream from='example.test' id='1'"
        b" version='1.0' xmlns='jabber:client' " + STREAMS + features
    )
    return header


@pytest.fixture
def tls_server(tmp_path: Path) -> tuple[ssl.SSLContext, bytes]:
    """Return a server context for a self-signed example.test, its DER."""
    cert, key = self_signed([HOST])
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return context, der_of(cert)


def test_tls_mode_returns_leaf_and_sends_sni(tls_server):
    """Direct TLS returns the DER of the served leaf, with SNI set."""
    tls_context, expected = tls_server
    names: list[str | None] = []
    tls_context.sni_callback = lambda _s, name, _c: names.append(name)

    def script(conn: socket.socket) -> None:
        with tls_context.wrap_socket(conn, server_side=True) as tls:
            wait_for_hangup(tls)

    with FakeServer(script) as server:
        leaf = fetch_served_leaf(HOST, "127.0.0.1", server.port, "tls", 5)

    assert leaf == expected
    assert names == [HOST]


@pytest.mark.parametrize(
    ("mode", "namespace"),
    [("xmpp-client", b"jabber:client"), ("xmpp-server", b"jabber:server")],
)
def test_starttls_returns_leaf(tls_server, mode, namespace):
    """STARTTLS opens the right stream, survives a split <proceed/>."""
    tls_context, expected = tls_server
    headers: list[bytes] = []
    names: list[str | None] = []
    tls_context.sni_callback = lambda _s, name, _c: names.append(name)

    def script(conn: socket.socket) -> None:
        headers.append(open_stream(conn, FEATURES_TLS))
        read_until(conn, b"/>")
        conn.sendall(PROCEED[:9])
        time.sleep(0.1)
        conn.sendall(PROCEED[9:])
        with tls_context.wrap_socket(conn, server_side=True) as tls:
            wait_for_hangup(tls)

    with FakeServer(script) as server:
        leaf = fetch_served_leaf(HOST, "127.0.0.1", server.port, mode, 5)

    assert leaf == expected
    assert f"to='{HOST}'".encode() in headers[0]
    assert b"xmlns='" + namespace + b"'" in headers[0]
    assert b"from=" not in headers[0]
    assert names == [HOST]


def no_starttls(conn: socket.socket) -> None:
    """Offer features without STARTTLS."""
    open_stream(conn, b"<stream:features><dialback/></stream:features>")
    wait_for_hangup(conn)


def stream_error(conn: socket.socket) -> None:
    """End the stream the way Prosody does when it has no certificate."""
    open_stream(
        conn,
        b"<stream:error><undefined-condition"
        b" xmlns='urn:ietf:params:xml:ns:xmpp-streams'/><text"
        b" xmlns='urn:ietf:params:xml:ns:xmpp-streams'>No stream features"
        b" to proceed with</text></stream:error></stream:stream>",
    )


def starttls_failure(conn: socket.socket) -> None:
    """Offer STARTTLS, then refuse it."""
    open_stream(conn, FEATURES_TLS)
    read_until(conn, b"/>")
    conn.sendall(
        b"<failure xmlns='urn:ietf:params:xml:ns:xmpp-tls'/></stream:stream>"
    )


def silent(conn: socket.socket) -> None:
    """Read the header and never answer."""
    read_until(conn, STREAMS)
    wait_for_hangup(conn)


def flood(conn: socket.socket) -> None:
    """Send whitespace for ever after the stream header."""
    open_stream(conn, b"")
    while True:
        conn.sendall(b" " * 4096)


def not_tls(conn: socket.socket) -> None:
    """Proceed to TLS, then speak plain text."""
    open_stream(conn, FEATURES_TLS)
    read_until(conn, b"/>")
    conn.sendall(PROCEED)
    conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")


def hang_up(conn: socket.socket) -> None:
    """Close right after the client's header."""
    read_until(conn, STREAMS)


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        (no_starttls, "server offered no STARTTLS"),
        (
            stream_error,
            (
                "server ended the stream before offering STARTTLS (stream"
                " error undefined-condition: No stream features to proceed"
                " with)"
            ),
        ),
        (starttls_failure, "answered STARTTLS with <failure/>"),
        (silent, "timed out waiting for stream features"),
        (flood, f"sent {MAX_PREAMBLE} bytes without finishing waiting"),
        (not_tls, "TLS handshake failed"),
        (hang_up, "server closed the connection waiting for stream"),
    ],
)
def test_starttls_failures_are_named(script, expected):
    """Each way STARTTLS can fail raises one line naming the server."""
    start = time.monotonic()
    with (
        FakeServer(script) as server,
        pytest.raises(VerifyError) as raised,
    ):
        fetch_served_leaf(HOST, "127.0.0.1", server.port, "xmpp-client", 0.5)

    message = str(raised.value)
    assert expected in message
    assert f"{HOST} at 127.0.0.1:{server.port} (xmpp-client)" in message
    assert "\n" not in message
    assert time.monotonic() - start < 2


def test_refused_connection_is_named():
    """A port nobody listens on is reported as a refused connection."""
    port = free_port()

    with pytest.raises(VerifyError, match="connection refused"):
        fetch_served_leaf(HOST, "127.0.0.1", port, "tls", 2)


def test_host_that_is_no_dns_name_is_refused():
    """A host that would break the stream header is refused before use."""
    with pytest.raises(VerifyError, match="not an ASCII DNS name"):
        fetch_served_leaf("a' b", "127.0.0.1", 1, "xmpp-client", 2)


# Real peers ----------------------------------------------------------------


@pytest.fixture(scope="module")
def pebble() -> Iterator[Pebble]:
    """Run one pebble for the whole module."""
    require_binaries("pebble")
    with Pebble() as server:
        yield server


@pytest.fixture(scope="module")
def certbot(pebble: Pebble) -> Iterator[Certbot]:
    """Issue one lineage for example.test and its MUC, shared."""
    require_binaries("certbot")
    with Certbot(pebble) as client:
        client.certonly([HOST, COMPONENT], cert_name=HOST)
        yield client


@pytest.fixture
def certs_dir() -> Iterator[Path]:
    """Yield a certificate directory the prosody user can read."""
    require_binaries("prosody", "prosodyctl", "setpriv")
    require_root()
    with prosody_certs_dir() as certs:
        yield certs


def install_live(certbot: Certbot, certs_dir: Path) -> bytes:
    """Copy the lineage into `certs_dir` as example.test; return its leaf."""
    live = certbot.config_dir / "live" / HOST
    fullchain = (live / "fullchain.pem").read_bytes()
    install_pair(
        certs_dir, HOST, fullchain, (live / "privkey.pem").read_bytes()
    )
    return der_of(fullchain)


@pytest.mark.peers
def test_certbot_lineage_chains_to_pebble_root(certbot, pebble):
    """The lineage names both hosts and chains to pebble's root."""
    live = certbot.config_dir / "live" / HOST
    leaf = x509.load_pem_x509_certificate((live / "cert.pem").read_bytes())
    chain = x509.load_pem_x509_certificate((live / "chain.pem").read_bytes())
    root = x509.load_pem_x509_certificate(pebble.issuing_roots_pem().encode())

    names = leaf.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.DNSName)
    assert sorted(names) == [COMPONENT, HOST]
    assert chain.public_bytes(serialization.Encoding.PEM).decode() == (
        pebble.intermediates_pem()
    )
    chain.verify_directly_issued_by(root)
    leaf.verify_directly_issued_by(chain)


@pytest.mark.peers
@pytest.mark.root
def test_prosody_serves_lineage_to_clients_and_component(certbot, certs_dir):
    """One file covering both names serves c2s and the component's s2s."""
    leaf = install_live(certbot, certs_dir)

    with Prosody(certs_dir) as prosody:
        assert served(prosody.c2s_port, HOST) == leaf
        assert served(prosody.s2s_port, HOST, "xmpp-server") == leaf
        assert served(prosody.s2s_port, COMPONENT, "xmpp-server") == leaf
        rc, output = prosody.check_certs()

    assert not (certs_dir / f"{COMPONENT}.crt").exists()
    assert rc == 0, output
    assert output.count(f"{certs_dir}/{HOST}.crt") == 2


@pytest.mark.peers
@pytest.mark.root
def test_component_falls_back_to_parent_without_coverage(certs_dir):
    """A component with no file of its own gets its parent's, unchecked."""
    cert, key = self_signed([HOST])
    install_pair(certs_dir, HOST, cert, key)

    with Prosody(certs_dir) as prosody:
        component_leaf = served(prosody.s2s_port, COMPONENT, "xmpp-server")
        rc, output = prosody.check_certs()

    assert component_leaf == der_of(cert)
    assert rc == 2
    assert f"Not valid for server-to-server connections to {COMPONENT}" in (
        output
    )


@pytest.mark.peers
@pytest.mark.root
def test_component_file_of_its_own_wins(certs_dir):
    """A conference.example.test.crt is served for the component on s2s."""
    cert, key = self_signed([HOST])
    install_pair(certs_dir, HOST, cert, key)
    own_cert, own_key = self_signed([COMPONENT])
    install_pair(certs_dir, COMPONENT, own_cert, own_key)

    with Prosody(certs_dir) as prosody:
        assert served(prosody.s2s_port, COMPONENT, "xmpp-server") == (
            der_of(own_cert)
        )
        assert served(prosody.c2s_port, HOST) == der_of(cert)


@pytest.mark.peers
@pytest.mark.root
def test_renewal_is_served_after_reload_only(certbot, certs_dir):
    """A renewed pair is served only after SIGHUP, then within seconds."""
    old = install_live(certbot, certs_dir)

    with Prosody(certs_dir) as prosody:
        assert served(prosody.c2s_port, HOST) == old
        certbot.renew(force=True)
        new = install_live(certbot, certs_dir)
        assert new != old
        assert served(prosody.c2s_port, HOST) == old

        prosody.reload()
        wait_for(
            lambda: serves(prosody.c2s_port, HOST, new),
            timeout=3,
            what="renewed leaf served on c2s",
        )
        assert served(prosody.s2s_port, COMPONENT, "xmpp-server") == new


@pytest.mark.peers
@pytest.mark.root
def test_mismatched_key_withdraws_starttls_until_fixed(certs_dir):
    """A key not matching its certificate leaves no STARTTLS after SIGHUP."""
    cert, key = self_signed([HOST])
    install_pair(certs_dir, HOST, cert, key)
    _, stranger = self_signed([HOST])

    with Prosody(certs_dir) as prosody:
        install_pair(certs_dir, HOST, cert, stranger)
        prosody.reload()

        def is_withdrawn() -> bool:
            try:
                served(prosody.c2s_port, HOST)
            except VerifyError:
                return True
            return False

        wait_for(is_withdrawn, timeout=3, what="STARTTLS withdrawn")
        with pytest.raises(VerifyError, match="before offering STARTTLS"):
            served(prosody.c2s_port, HOST)
        with pytest.raises(VerifyError, match="server offered no STARTTLS"):
            served(prosody.s2s_port, HOST, "xmpp-server")
        assert "private key does not match public key" in prosody.log_text()

        install_pair(certs_dir, HOST, cert, key)
        prosody.reload()
        wait_for(
            lambda: serves(prosody.c2s_port, HOST, der_of(cert)),
            timeout=3,
            what="STARTTLS restored",
        )
