"""Read the leaf certificate a running server actually serves.

The daemon compares the served leaf with the installed one to prove that a
reload took effect. Certificates are fetched without verification on
purpose: the caller compares fingerprints, so a self-signed, expired or
mismatched certificate must still be returned rather than refused.
"""

import re
import socket
import ssl
import time
from typing import Literal, get_args

from certwatchd.errors import CertwatchdError

Mode = Literal["xmpp-client", "xmpp-server", "tls"]

# What a server may send before TLS starts; more than this is not XMPP.
MAX_PREAMBLE = 64 * 1024

_MAX_PORT = 65535

_STREAM_NAMESPACES = {
    "xmpp-client": "jabber:client",
    "xmpp-server": "jabber:server",
}
_HOST = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9_.])?")
_STREAM_ERROR = re.compile(rb"<stream:error>\s*<([A-Za-z-]+)")
_ERROR_TEXT = re.compile(rb"<text[^>]*>([^<]{1,200})</text>")
_FEATURES_END = (b"</stream:features>", b"<stream:features/>")
# Either ends a stream; a server may close the socket after the first.
_STREAM_ENDS = (b"</stream:error>", b"</stream:stream>")


class VerifyError(CertwatchdError):
    """The served certificate could not be read; the message says why."""


def fetch_served_leaf(
    host: str, address: str, port: int, mode: Mode, timeout: float
) -> bytes:
    """Connect, negotiate TLS with SNI=host, return the DER of the peer's leaf.

    The XMPP modes open a stream to `host` and upgrade it with STARTTLS;
    "tls" starts TLS at once. `timeout` bounds the whole exchange. Any
    failure raises VerifyError naming host, address, port and the step.
    """
    if not _HOST.fullmatch(host):
        msg = f"host {host!r} is not an ASCII DNS name"
        raise VerifyError(msg)
    where = _describe(host, address, port, mode)
    if mode not in get_args(Mode):
        msg = f"{where}: unknown mode, expected one of {get_args(Mode)}"
        raise VerifyError(msg)
    if not 0 < port <= _MAX_PORT:
        msg = f"{where}: port out of range, expected 1 to {_MAX_PORT}"
        raise VerifyError(msg)

    deadline = time.monotonic() + timeout
    sock = _connect(address, port, deadline, where)
    try:
        if mode != "tls":
            stream = _Preamble(sock, deadline, where)
            _start_tls(stream, host, _STREAM_NAMESPACES[mode])
        return _handshake(sock, host, deadline, where)
    finally:
        sock.close()


def _describe(host: str, address: str, port: int, mode: str) -> str:
    """Say which server is meant, for the start of every message."""
    shown = f"[{address}]" if ":" in address else address
    return f"cannot read the certificate of {host} at {shown}:{port} ({mode})"


def _remaining(deadline: float, where: str, step: str) -> float:
    """Return the seconds left before the deadline, or raise if none."""
    left = deadline - time.monotonic()
    if left <= 0:
        msg = f"{where}: timed out {step}"
        raise VerifyError(msg)
    return left


def _connect(
    address: str, port: int, deadline: float, where: str
) -> socket.socket:
    """Open the TCP connection within the deadline."""
    step = "connecting"
    try:
        return socket.create_connection(
            (address, port), timeout=_remaining(deadline, where, step)
        )
    except TimeoutError:
        msg = f"{where}: timed out {step}"
        raise VerifyError(msg) from None
    except ConnectionRefusedError:
        msg = f"{where}: connection refused"
        raise VerifyError(msg) from None
    except OSError as exc:
        msg = f"{where}: cannot connect: {exc.strerror or exc}"
        raise VerifyError(msg) from None


class _Preamble:
    """The plain-text part of an XMPP stream, read into a bounded buffer.

    Elements are found by substring search, never parsed as XML, so no
    entity is ever expanded. The streams namespace is expected under the
    `stream:` prefix, which is the one Prosody uses; a server binding it to
    another prefix would be reported as sending no stream features.
    """

    def __init__(
        self, sock: socket.socket, deadline: float, where: str
    ) -> None:
        self._sock = sock
        self._deadline = deadline
        self.where = where
        self.buffer = b""
        self._received = 0

    def send(self, data: bytes, step: str) -> None:
        """Send all of `data` within the deadline."""
        self._sock.settimeout(_remaining(self._deadline, self.where, step))
        try:
            self._sock.sendall(data)
        except TimeoutError:
            msg = f"{self.where}: timed out {step}"
            raise VerifyError(msg) from None
        except OSError as exc:
            msg = f"{self.where}: connection lost {step}: {exc.strerror}"
            raise VerifyError(msg) from None

    def receive_until(self, markers: tuple[bytes, ...], step: str) -> None:
        """Read until the buffer holds one of `markers`.

        Raises when the server closes, the deadline passes or the server
        has sent MAX_PREAMBLE bytes in all.
        """
        while not any(marker in self.buffer for marker in markers):
            if self._received >= MAX_PREAMBLE:
                msg = (
                    f"{self.where}: server sent {MAX_PREAMBLE} bytes"
                    f" without finishing {step}"
                )
                raise VerifyError(msg)

            wait = _remaining(self._deadline, self.where, step)
            self._sock.settimeout(wait)
            try:
                chunk = self._sock.recv(MAX_PREAMBLE - self._received)
            except TimeoutError:
                msg = f"{self.where}: timed out {step}"
                raise VerifyError(msg) from None
            except OSError as exc:
                msg = f"{self.where}: connection lost {step}: {exc.strerror}"
                raise VerifyError(msg) from None

            if not chunk:
                msg = f"{self.where}: server closed the connection {step}"
                raise VerifyError(msg)
            self._received += len(chunk)
            self.buffer += chunk

    def raise_if_stream_error(self, step: str) -> None:
        """Raise with the condition and text if the server ended the stream.

        Prosody 0.12 ends a client stream this way when it has no usable
        certificate: it has no stream features left to offer.
        """
        if not any(end in self.buffer for end in _STREAM_ENDS):
            return

        found = _STREAM_ERROR.search(self.buffer)
        condition = found.group(1).decode("ascii") if found else "none"
        detail = ""
        text = _ERROR_TEXT.search(self.buffer)
        if text:
            printable = text.group(1).decode("ascii", "replace")
            printable = "".join(
                c if c.isprintable() else "?" for c in printable
            )
            detail = f": {printable}"
        msg = (
            f"{self.where}: server ended the stream {step}"
            f" (stream error {condition}{detail})"
        )
        raise VerifyError(msg)


def _start_tls(stream: _Preamble, host: str, namespace: str) -> None:
    """Open an XMPP stream to `host` and have the server proceed to TLS.

    Returns once the server's `<proceed/>` has been read entirely, so that
    the next byte on the socket belongs to the TLS handshake.
    """
    header = (
        f"<?xml version='1.0'?><stream:stream to='{host}' version='1.0'"
        f" xmlns='{namespace}'"
        " xmlns:stream='http://etherx.jabber.org/streams'>"
    )
    stream.send(header.encode("ascii"), "sending the stream header")

    step = "waiting for stream features"
    stream.receive_until((*_FEATURES_END, *_STREAM_ENDS), step)
    stream.raise_if_stream_error("before offering STARTTLS")
    start = stream.buffer.find(b"<stream:features")
    if start < 0 or b"<starttls" not in stream.buffer[start:]:
        msg = f"{stream.where}: server offered no STARTTLS"
        raise VerifyError(msg)

    stream.buffer = b""
    request = b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
    stream.send(request, "requesting STARTTLS")

    step = "waiting for the STARTTLS answer"
    stream.receive_until((b"<proceed", b"<failure", *_STREAM_ENDS), step)
    if b"<failure" in stream.buffer:
        msg = f"{stream.where}: server answered STARTTLS with <failure/>"
        raise VerifyError(msg)
    stream.raise_if_stream_error("instead of answering STARTTLS")

    # The tag may have arrived in pieces; TLS must not start inside it.
    stream.buffer = stream.buffer[stream.buffer.find(b"<proceed") :]
    stream.receive_until((b">",), step)


def _handshake(
    sock: socket.socket, host: str, deadline: float, where: str
) -> bytes:
    """Run the TLS handshake on `sock` and return the peer's leaf DER."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE

    step = "during the TLS handshake"
    sock.settimeout(_remaining(deadline, where, step))
    try:
        tls = context.wrap_socket(sock, server_hostname=host)
    except TimeoutError:
        msg = f"{where}: timed out {step}"
        raise VerifyError(msg) from None
    except ssl.SSLError as exc:
        msg = f"{where}: TLS handshake failed: {exc.reason or exc}"
        raise VerifyError(msg) from None
    except OSError as exc:
        msg = f"{where}: TLS handshake failed: {exc.strerror or exc}"
        raise VerifyError(msg) from None

    with tls:
        leaf = tls.getpeercert(binary_form=True)
    if leaf is None:
        msg = f"{where}: server sent no certificate"
        raise VerifyError(msg)
    return leaf
