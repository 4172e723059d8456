"""The upstream side: one connection class and one translator module per OpenAI dialect.

`dialect_for(name)` returns the `UpstreamDialect` for "ga" or "beta"; the session speaks only the
internal (GA-named) event model and lets the dialect translate both ways.
"""
from gateway.upstream.connection import (MAX_UPSTREAM_MESSAGE_BYTES, UpstreamConnection, UpstreamListener,
                                         build_upstream_url)
from gateway.upstream.dialect import UpstreamDialect
from gateway.upstream.ga import GaDialect
from gateway.upstream.beta import BetaDialect

_DIALECTS = {"ga": GaDialect(), "beta": BetaDialect()}


def dialect_for(name: str) -> UpstreamDialect:
    return _DIALECTS[name]


__all__ = ["MAX_UPSTREAM_MESSAGE_BYTES", "UpstreamConnection", "UpstreamListener", "UpstreamDialect", "GaDialect", "BetaDialect",
           "build_upstream_url", "dialect_for"]
