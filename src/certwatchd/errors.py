"""Errors certwatchd raises; only the command line maps them to exit codes."""


class CertwatchdError(Exception):
    """Root of every error certwatchd raises on purpose."""


class ConfigError(CertwatchdError):
    """The configuration names a value that cannot work.

    Raised while loading settings or resolving owners; the message names
    the key, the value and what was expected.
    """


class PairError(CertwatchdError):
    """A certificate/key pair is refused; nothing is installed from it."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class InstallError(CertwatchdError):
    """Writing into the certificate directory failed; old files are intact."""
