"""Reading small files safely and splitting PEM text into blocks."""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

from certwatchd.errors import PairError

MAX_FILE_BYTES = 1 << 20

# White space as bytes.strip() sees it, then a block's first line.
_PEM_HEADER = re.compile(
    rb"[ \t\n\r\x0b\x0c]*(-----BEGIN ([A-Z0-9 ]+)-----\r?\n)"
)


def read_small_file(path: str | Path) -> bytes:
    """Read a regular file of at most 1 MiB without ever blocking.

    Symlinks are followed; a FIFO, a device, a directory or a larger file
    is refused before anything is read from it.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise PairError(str(path), _open_failure(exc)) from None
    except ValueError:
        # No file system name holds a NUL byte; os.open refuses to try.
        raise PairError(str(path), "has a NUL byte in its name") from None

    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = _file_kind(info.st_mode)
            msg = f"is {kind}, expected a regular file"
            raise PairError(str(path), msg)
        if info.st_size > MAX_FILE_BYTES:
            msg = f"is {info.st_size} bytes, expected at most 1 MiB"
            raise PairError(str(path), msg)

        chunks = []
        remaining = MAX_FILE_BYTES + 1
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 65536))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    except OSError as exc:
        msg = f"cannot be read: {exc.strerror}"
        raise PairError(str(path), msg) from None
    finally:
        os.close(fd)

    data = b"".join(chunks)
    if len(data) > MAX_FILE_BYTES:
        msg = "grew past 1 MiB while being read"
        raise PairError(str(path), msg)
    return data


def _open_failure(exc: OSError) -> str:
    reasons = {
        errno.ENOENT: "does not exist (or is a dangling link)",
        errno.ELOOP: "is a symlink loop",
        errno.EACCES: "is not readable (permission denied)",
        errno.EPERM: "is not readable (operation not permitted)",
        errno.ENOTDIR: "has a path component that is not a directory",
    }
    return reasons.get(exc.errno or 0, f"cannot be opened: {exc.strerror}")


def _file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def split_pem(data: bytes, path: Path) -> list[tuple[bytes, bytes]]:
    """Split PEM text into ``(label, whole block)`` pairs.

    Only white space may stand between and around the blocks: text that
    is not PEM, DER, a truncated block or trailing junk is refused.
    """
    if not data.strip():
        raise PairError(str(path), "is empty")

    # Each block is looked for only where the previous one ended, and its
    # end line with one forward search: hostile text of many unfinished
    # blocks costs one pass over the data, not one pass per block.
    blocks = []
    position = 0
    while header := _PEM_HEADER.match(data, position):
        label = header.group(2)
        footer = b"-----END " + label + b"-----"
        end = data.find(footer, header.end())
        if end < 0:
            break
        block_end = end + len(footer)
        blocks.append((label, data[header.start(1) : block_end] + b"\n"))
        position = block_end

    if not blocks:
        raise PairError(str(path), _not_pem_reason(data))
    if data[position:].strip():
        offset = (
            position + len(data[position:]) - len(data[position:].lstrip())
        )
        msg = f"has data that is not PEM after byte {offset}"
        if b"-----BEGIN" in data[position:]:
            msg = f"has a truncated or malformed PEM block at byte {offset}"
        raise PairError(str(path), msg)
    return blocks


def _not_pem_reason(data: bytes) -> str:
    if data.startswith((b"\x30\x82", b"\x30\x81")):
        return "is DER (binary), expected PEM"
    if b"-----BEGIN" in data:
        return "has a truncated or malformed PEM block"
    return "is not PEM"
