"""A faithful mock of OpenAI's Realtime WebSocket server (SPEC §4).

    from gateway.mock import MockRealtimeServer, MockOptions

    async with MockRealtimeServer(MockOptions(pacing="fast")) as server:
        ...  # connect to server.url with "Authorization: Bearer test-key-1"
        session = await server.wait_for_session(0)
        await session.wait_for_server_event("response.done")

Both dialects (GA; beta by header, or the 2026 rejection), session.update validation, an
energy VAD, the full response ladder, out-of-band responses and response `input`, function
calls, barge-in, truncation, the §8 error catalogue and fault injection. The voice echoes the
user's committed turn bit-exactly.
"""
from .options import MockOptions
from .server import MockRealtimeServer
from .session import MockSession

__all__ = ["MockOptions", "MockRealtimeServer", "MockSession"]
