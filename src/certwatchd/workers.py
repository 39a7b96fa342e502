"""Validating many pairs at once in forked child processes.

Only the one-shot commands use this: forking is safe there because no
other thread runs. Each child validates its share of the pairs and
sends the outcomes back pickled through a pipe; a child that fails has
its share redone by the caller.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from certwatchd.certificate import Pair, TrustStore, load_pair
from certwatchd.errors import PairError
from certwatchd.sources import Source

# Stands for the source's own paths in a pair sent back by a child.
_KNOWN = Path()


@dataclass(frozen=True)
class Result:
    """What a child sends back for one source: a pair or a refusal.

    A pair comes without its paths, which are the source's.
    """

    digest: str = ""
    pair: Pair | None = None
    path: str = ""
    reason: str = ""
    breaks_tls: bool = True


class _Capture:
    """Verdicts for a child: it knows nothing, and keeps the digest."""

    digest = ""

    def recall(
        self, digest: str, cert_path: Path, key_path: Path, blocks: bytes
    ) -> Pair | None:
        """Know nothing: the parent asked because its cache missed."""
        del cert_path, key_path, blocks
        self.digest = digest
        return None

    def remember(self, digest: str, pair: Pair) -> None:
        """Keep the digest to send back with the pair."""
        del pair
        self.digest = digest


def fork_validation(
    sources: list[Source], trust: TrustStore, now: datetime
) -> tuple[int, int] | None:
    """Validate ``sources`` in a child; return its pid and result pipe.

    Returns ``None`` if no child could be started.
    """
    try:
        read_end, write_end = os.pipe()
    except OSError:
        return None
    try:
        pid = os.fork()
    except OSError:
        os.close(read_end)
        os.close(write_end)
        return None
    if pid == 0:  # pragma: no cover - runs in the child
        status = 1
        try:
            os.close(read_end)
            results: list[Result] = []
            for source in sources:
                capture = _Capture()
                try:
                    pair = load_pair(
                        source.cert_path, source.key_path, trust, now, capture
                    )
                except PairError as exc:
                    results.append(
                        Result(
                            path=exc.path,
                            reason=exc.reason,
                            breaks_tls=exc.breaks_tls,
                        )
                    )
                else:
                    # The parent knows the paths; one shared stand-in
                    # spares it unpickling two paths per pair.
                    sent = replace(pair, cert_path=_KNOWN, key_path=_KNOWN)
                    results.append(Result(capture.digest, sent))
            data = pickle.dumps(results, protocol=pickle.HIGHEST_PROTOCOL)
            view = memoryview(data)
            while view:
                view = view[os.write(write_end, view) :]
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    return pid, read_end


def collect(pid: int, fd: int) -> list[Result | None] | None:
    """Read a child's outcomes and reap it; ``None`` if it failed."""
    chunks = []
    try:
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
    except OSError:
        chunks = []
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    if status != 0 or not chunks:
        return None
    try:
        results = pickle.loads(b"".join(chunks))  # noqa: S301 - our child
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError):
        return None
    return results if isinstance(results, list) else None
