"""Keep Prosody's TLS certificates in step with Let's Encrypt."""

__version__ = "0.1.0"
