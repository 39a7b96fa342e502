"""Errors certwatchd raises; only the command line maps them to exit codes."""


class CertwatchdError(Exception):
    """Root of every error certwatchd raises on purpose."""


class ConfigError(CertwatchdError):
    """The configuration names a value that cannot work.

    Raised while loading settings or resolving owners; the message names
    the key, the value and what was expected.
    """


class PairError(CertwatchdError):
    """A certificate/key pair is refused; nothing is installed from it.

    ``breaks_tls`` says whether Prosody itself would fail to use the pair
    (unreadable, not PEM, a key that does not match): such a pair left in
    Prosody's directory can take TLS down at the next reload. A pair that
    is merely untrusted (expired, a chain that does not verify, odd
    names) still loads in Prosody.
    """

    def __init__(
        self, path: str, reason: str, *, breaks_tls: bool = True
    ) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
        self.breaks_tls = breaks_tls


class InstallError(CertwatchdError):
    """Writing into the certificate directory failed; old files are intact."""
