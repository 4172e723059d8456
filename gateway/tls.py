"""The node's own TLS: `wss://` for clients, and `https://` for /health, /ready and /metrics.

A browser page served over https may only open `wss://` sockets, so a node that is not behind a
TLS-terminating load balancer needs `--tls-cert` (and `--tls-key`, unless the key is in the same
file). Certificates are renewed while calls go on: SIGHUP re-reads both files into the context
the listener uses, after loading them into a scratch context first, so a bad pair is refused
with one log line and the old certificate stays in service.
"""
from __future__ import annotations

import os
import ssl


class TLSFilesError(ValueError):
    """The certificate or key cannot be used; the message names the problem, never the key.
    `path` is the file at fault, where one is (the key's or the certificate's)."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class _EncryptedKey(Exception):
    pass


def _no_password() -> bytes:
    # without a callback OpenSSL would ask for the password on the terminal and block the node
    raise _EncryptedKey


def server_context(cert: str, key: str | None = None) -> ssl.SSLContext:
    """A server context for `cert` (a PEM chain, leaf first) and `key` (PEM, unencrypted)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])  # WebSocket upgrades are HTTP/1.1 requests
    load(context, cert, key)
    return context


def load(context: ssl.SSLContext, cert: str, key: str | None) -> None:
    """Load `cert` and `key` into `context`, or raise TLSFilesError saying why not."""
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except _EncryptedKey:
        raise TLSFilesError(f"the key in {key or cert} is encrypted; give it unencrypted "
                            "(readable by the node's user only)", key or cert) from None
    except FileNotFoundError:  # OpenSSL's error names no file: find it
        missing = next((path for path in (cert, key) if path and not os.path.exists(path)), cert)
        raise TLSFilesError(f"no such file: {missing}", missing) from None
    except IsADirectoryError:
        directory = next((path for path in (cert, key) if path and os.path.isdir(path)), cert)
        raise TLSFilesError(f"{directory} is a directory, not a PEM file", directory) from None
    except PermissionError:
        unreadable = next((path for path in (cert, key) if path and not os.access(path, os.R_OK)), cert)
        raise TLSFilesError(f"cannot read {unreadable}: permission denied", unreadable) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TLSFilesError(f"the key in {key or cert} is not the certificate's key", key or cert) from None
        raise TLSFilesError(f"{cert}{' / ' + key if key else ''} is not a PEM certificate chain and "
                            f"key ({exc.reason or exc.strerror})", key if key and not _holds_a_key(key) else cert) from None


def _holds_a_key(path: str) -> bool:
    """Whether the file at `path` has a PEM private key in it (read here, never shown)."""
    try:
        with open(path, "rb") as file:
            return b"PRIVATE KEY-----" in file.read(1 << 20)
    except OSError:
        return False


def reload(context: ssl.SSLContext, cert: str, key: str | None) -> None:
    """Put `cert` and `key` in service for new connections (existing ones keep theirs). They are
    loaded into a scratch context first: a pair that cannot be used raises TLSFilesError and
    leaves `context` as it was."""
    server_context(cert, key)
    load(context, cert, key)
