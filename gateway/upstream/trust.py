"""The TLS context every wss:// upstream connection of this process uses: what it trusts, and the
sessions it resumes.

One context per process, because a context holds its own parsed copy of the trusted CAs: the
system bundle (~140 certificates) is ~0.8 MiB and ~15 ms of CPU per context, which picows, left to
itself (uvloop's `ssl=True`), pays again for every connection. SIGHUP reads the CAs again into a
new context (`reload_client_trust`).

Resumption: a gateway opens every upstream session to the same host, so it offers that host's
latest TLS session ticket instead of a full handshake each time (nginx does the same by default,
`proxy_ssl_session_reuse on`): the server skips its certificate chain and we skip verifying it.
A ticket the server no longer takes costs nothing: the handshake is then a full one.
"""
from __future__ import annotations

import os
import ssl
import sys

#: hosts whose latest session is kept (a node talks to one or two: the bound is for safety)
MAX_RESUMABLE_HOSTS = 64


class TrustStoreError(Exception):
    """A reloaded trust store the node refused (it keeps the one in service)."""


class ResumingContext(ssl.SSLContext):
    """A client context that offers each host the session of its latest connection."""

    def __init__(self, protocol: int) -> None:  # (ssl.SSLContext.__new__ takes the protocol)
        super().__init__()
        # a session belongs to the context that made it (OpenSSL refuses another's), so the
        # sessions live and die with their context
        self.sessions: dict[str, ssl.SSLSession] = {}

    def wrap_bio(self, incoming, outgoing, server_side=False, server_hostname=None, session=None):
        # how uvloop's TLS transport (and asyncio's) starts every connection's TLS
        if session is None and not server_side and server_hostname is not None:
            session = self.sessions.get(server_hostname)
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)

    def remember(self, ssl_object: ssl.SSLObject) -> None:
        """Keep the session of a connection whose handshake is complete, for the next one to
        the same host. Only one carrying a ticket resumes (a TLS 1.3 session has none until the
        server's NewSessionTicket, which precedes the WebSocket upgrade's answer)."""
        session = ssl_object.session
        host = ssl_object.server_hostname
        if session is None or not session.has_ticket or host is None:
            return
        if host not in self.sessions and len(self.sessions) >= MAX_RESUMABLE_HOSTS:
            self.sessions.clear()
        self.sessions[host] = session


def _verifying_context() -> ResumingContext:
    """`ssl.create_default_context()`'s settings: the chain and the host name verified against
    the system's CAs (or SSL_CERT_FILE / SSL_CERT_DIR's)."""
    context = ResumingContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    if sys.version_info >= (3, 13):  # what create_default_context adds from 3.13 on
        context.verify_flags |= ssl.VERIFY_X509_STRICT | ssl.VERIFY_X509_PARTIAL_CHAIN
    context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    return context


#: ((SSL_CERT_FILE, SSL_CERT_DIR) it was read from, the context): see `client_tls_context`
_trust: tuple[tuple[str | None, str | None], ResumingContext] | None = None


def client_tls_context() -> ResumingContext:
    """The process's context, made on first use. Keyed on the variables OpenSSL reads the trust
    store from, so a changed `SSL_CERT_FILE` is honoured (tests change it)."""
    global _trust
    where = _trust_store_location()
    if _trust is None or _trust[0] != where:
        _trust = where, _verifying_context()
    return _trust[1]


def reload_client_trust() -> str:
    """SIGHUP: read the trusted CAs again (a rotated private CA, an updated system bundle) for
    the connections opened from now on; open ones keep theirs. A store that now yields no CA
    where the one in service had some (a truncated or emptied file) is refused with
    `TrustStoreError`, and the one in service stays. Returns what the new store holds."""
    global _trust
    in_service = client_tls_context()
    context = _verifying_context()
    held, had = _ca_count(context), _ca_count(in_service)
    if held == 0 and had > 0:
        raise TrustStoreError(f"the trusted CA certificates ({_trust_store_name()}) now yield none, where "
                              f"{had} were in service: kept those")
    _trust = _trust_store_location(), context
    return f"{held} CA certificate(s) from {_trust_store_name()}"


def _trust_store_location() -> tuple[str | None, str | None]:
    return os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR")


def _trust_store_name() -> str:
    cert_file, cert_dir = _trust_store_location()
    return cert_file or cert_dir or ssl.get_default_verify_paths().openssl_cafile


def _ca_count(context: ssl.SSLContext) -> int:
    # certificates read from a file; a hashed directory's are read when a chain needs them
    return context.cert_store_stats()["x509_ca"]
