"""Client admission (gateway/auth.py): API keys, JWT, token locations, origins, session limits,
and that no secret ever shows up in anything returned, raised or logged."""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
import warnings

import jwt
import orjson
import pytest
import websockets
from multidict import CIMultiDict
from picows import WSListener, WSMsgType, ws_create_server
from picows.common import WSUpgradeRequest, WSUpgradeResponse, WSUpgradeResponseWithListener

from gateway.auth import (API_KEYS_ENV, BEARER_SUBPROTOCOL_PREFIX, SUBPROTOCOL, AuthRefusal, AuthSettings, ClientAuthenticator,
                          LimitRefusal, OriginPolicy, Principal, SessionLimiter, Slot, client_ip, extract_credentials,
                          forwarded_address, is_loopback_host, limit_address, parse_api_keys_env, parse_api_keys_file, redact_path)
from gateway.config import ConfigError
from tests.support import run

KEY_A = "test-client-key-1"
KEY_B = "test-client-key-2"
JWT_SECRET = "test-jwt-secret-0123456789abcdef-0123"  # >= 32 bytes
OTHER_SECRET = "test-jwt-secret-wrong-0123456789abcdef"


def request(path: str = "/realtime", headers: list[tuple[str, str]] | None = None) -> WSUpgradeRequest:
    req = WSUpgradeRequest()
    req.method = b"GET"
    req.path = path.encode("latin-1")
    req.version = b"HTTP/1.1"
    req.headers = CIMultiDict(headers or [])
    return req


def bearer(token: str) -> WSUpgradeRequest:
    return request(headers=[("Authorization", f"Bearer {token}")])


def make_jwt(secret: str = JWT_SECRET, algorithm: str = "HS256", **claims) -> str:
    payload = {"sub": "tenant-7", "exp": int(time.time()) + 300}
    payload.update(claims)
    payload = {name: value for name, value in payload.items() if value is not None}
    return jwt.encode(payload, secret, algorithm=algorithm)


def authenticator(**settings) -> ClientAuthenticator:
    return ClientAuthenticator.from_settings(AuthSettings(**settings))


def assert_secret_free(obj, *secrets: str) -> None:
    for text in (repr(obj), str(obj)):
        for secret in secrets:
            assert secret not in text, f"secret leaked in {text!r}"
    if isinstance(obj, AuthRefusal):
        for secret in secrets:
            assert secret.encode() not in obj.body


# ---- static keys -------------------------------------------------------------------------


def test_keys_from_file_with_ids_comments_and_bare_keys(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text(f"# team keys\n\nalice:{KEY_A}\n   {KEY_B}   \n# old: revoked\n")
    auth = authenticator(api_keys_file=str(path), max_sessions_per_key=3)
    assert auth.enabled
    assert auth.authenticate(bearer(KEY_A)) == Principal("alice", 3, None, "api_key")
    assert auth.authenticate(bearer(KEY_B)) == Principal("keyfile#4", 3, None, "api_key")
    assert auth.authenticate(bearer("test-client-key-3")) == AuthRefusal(
        401, "Unauthorized", "invalid credentials", (("WWW-Authenticate", 'Bearer realm="realtime-gateway"'),))
    assert auth.authenticate(bearer("# team keys")).status == 401
    assert_secret_free(auth, KEY_A, KEY_B)


def test_keys_from_env_and_file_combined(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text(f"file-user:{KEY_A}\n")
    settings = AuthSettings.from_env({"GATEWAY_API_KEYS": f" env-user:{KEY_B} , test-client-key-9,"},
                                     api_keys_file=str(path))
    assert_secret_free(settings, KEY_B, "test-client-key-9")
    auth = ClientAuthenticator.from_settings(settings)
    assert auth.authenticate(bearer(KEY_A)).id == "file-user"
    assert auth.authenticate(bearer(KEY_B)).id == "env-user"
    assert auth.authenticate(bearer("test-client-key-9")).id == "env#2"
    assert auth.authenticate(bearer("test-client-key-")).status == 401  # a prefix of a key is not the key


def test_key_config_errors_never_echo_the_line(tmp_path):
    cases = [("bad id!:test-client-key-secret-1", "line 1"), ("ok:has space-test-client-key-secret-1", "line 1"),
             ("\n\nid:", "line 3")]
    for text, where in cases:
        path = tmp_path / "keys.txt"
        path.write_text(text)
        with pytest.raises(ConfigError) as info:
            authenticator(api_keys_file=str(path))
        assert where in str(info.value) and "test-client-key-secret-1" not in str(info.value)
    with pytest.raises(ConfigError, match="twice"):
        ClientAuthenticator(parse_api_keys_env(f"a:{KEY_A},b:{KEY_A}"))
    with pytest.raises(ConfigError, match="cannot read"):
        authenticator(api_keys_file=str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ConfigError, match="no keys"):
        authenticator(api_keys_file=str(tmp_path / "empty.txt"))
    with pytest.raises(ConfigError, match="32 bytes"):
        authenticator(jwt_secret="short-secret")


def test_short_keys_are_refused_without_quoting_them(tmp_path):
    """Found by an auth audit: `GATEWAY_API_KEYS=x` was accepted, and a bare key containing ':'
    silently became `id:key` with a short secret. A key needs 16 characters (the JWT secret 32
    bytes); the error names the entry, never its text, and says how a ':' is read."""
    for value, where in (("x", "GATEWAY_API_KEYS entry 1"),
                         (f"{KEY_A},short-key-15chr", "GATEWAY_API_KEYS entry 2")):
        with pytest.raises(ConfigError) as info:
            parse_api_keys_env(value)
        assert str(info.value) == f"{where}: the key must be at least 16 characters"
    path = tmp_path / "keys.txt"
    path.write_text(f"# generated\n{KEY_A}\nsk-live:Zm9vYmFyYmF6cXV\n")  # 15 characters after the ':'
    with pytest.raises(ConfigError) as info:
        authenticator(api_keys_file=str(path))
    assert str(info.value) == (f"{path} line 3: the key must be at least 16 characters "
                               "(an entry with a ':' is `id:key`, split at its first ':')")
    assert "Zm9vYmFyYmF6cXV" not in str(info.value)
    # 16 characters pass, and everything after the first ':' is the key, ':' included
    assert ClientAuthenticator(parse_api_keys_env("k" * 16)).verify_token("k" * 16).id == "env#1"
    split = ClientAuthenticator(parse_api_keys_env("svc:part-one:part-two"))
    assert split.verify_token("part-one:part-two").id == "svc"


def test_a_key_a_subprotocol_cannot_carry_is_named_at_start(caplog):
    """Found by a client audit: a base64 key (`/`, `=`) passed the start-up check, and then no
    browser, Node or `websockets` client could offer it as a subprotocol (they refuse to send
    it). It is still a valid key (header and ?token= work): the node says so at start, by id."""
    base64_key = "b64/Key+With=Slash0123456789ab"
    with caplog.at_level(logging.WARNING, logger="gateway.auth"):
        keys = parse_api_keys_env(f"web-b64:{base64_key},svc:{KEY_A}")
        parse_api_keys_env(f"web-b64:{base64_key}")  # read again (SIGHUP): said once is enough
        parse_api_keys_env(f"web-b64:{base64_key}x")  # another key under that id: said again
    assert ClientAuthenticator(keys).verify_token(base64_key).id == "web-b64"
    assert len(caplog.records) == 2
    assert caplog.records[0].getMessage().startswith(f"{API_KEYS_ENV} entry 1: key web-b64 has a character a "
                                                     "WebSocket subprotocol cannot carry")
    assert base64_key not in caplog.text and "Slash" not in caplog.text


def test_key_ids_are_positional_not_derived_from_the_key():
    keys = parse_api_keys_file(f"{KEY_A}\n\n{KEY_B}\n") + parse_api_keys_env(f"{KEY_A}x")
    assert [key.id for key in keys] == ["keyfile#1", "keyfile#3", "env#1"]
    for key in keys:
        assert_secret_free(key, KEY_A, KEY_B)


def test_explicit_key_ids_cannot_take_the_automatic_ones():
    """Found by an auth audit: `keyfile#1:<key>` or `env#2:<key>` would share the per-key limit
    (and the log name) of another entry's bare key."""
    for value in (f"keyfile#1:{KEY_A}", f"env#2:{KEY_A}", f"{KEY_B},env#1:{KEY_A}"):
        with pytest.raises(ConfigError) as info:
            parse_api_keys_env(value)
        assert "reserved for keys given without an id" in str(info.value) and KEY_A not in str(info.value)
    with pytest.raises(ConfigError, match="line 2: key ids keyfile#N and env#N are reserved"):
        parse_api_keys_file(f"{KEY_B}\nkeyfile#1:{KEY_A}\n")
    # ids that merely resemble them are ordinary ids
    keys = parse_api_keys_env(f"keyfile:{KEY_A},env#x:{KEY_B},team#1:{KEY_A}-3")
    assert [key.id for key in keys] == ["keyfile", "env#x", "team#1"]


def test_key_ids_and_token_subjects_are_counted_apart():
    """A JWT whose `sub` is `keyfile#1` is not the client holding key-file line 1: per-key limits
    count under `key:<id>` and `jwt:<sub>`."""
    auth = ClientAuthenticator(parse_api_keys_file(f"{KEY_A}\n"), jwt_secret=JWT_SECRET, max_sessions_per_key=1)
    by_key = auth.authenticate(bearer(KEY_A))
    by_token = auth.authenticate(bearer(make_jwt(sub="keyfile#1")))
    assert by_key.id == by_token.id == "keyfile#1"
    assert (by_key.limit_key, by_token.limit_key) == ("key:keyfile#1", "jwt:keyfile#1")
    assert Principal("anonymous", None, None, "anonymous").limit_key == "anonymous:anonymous"


def test_static_key_match_compares_every_key(monkeypatch):
    import gateway.auth as auth_module
    keys = parse_api_keys_env(",".join(f"k{i}:test-client-key-{i}" for i in range(5)))
    auth = ClientAuthenticator(keys)
    calls = []
    real = auth_module.hmac.compare_digest

    def counting(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth_module.hmac, "compare_digest", counting)
    for token in ("test-client-key-0", "test-client-key-4", "nope", "x" * 4000):
        calls.clear()
        auth.verify_token(token)
        # no early exit on a match, and equal-length digests whatever the token's length
        assert calls == [(32, 32)] * 5
    assert auth.verify_token("test-client-key-0").id == "k0" and auth.verify_token("test-client-key-4").id == "k4"


# ---- JWT ---------------------------------------------------------------------------------


def test_jwt_valid_with_subject_and_per_token_session_limit():
    auth = authenticator(jwt_secret=JWT_SECRET, max_sessions_per_key=2)
    assert auth.authenticate(bearer(make_jwt())) == Principal("tenant-7", 2, None, "jwt")
    assert auth.authenticate(bearer(make_jwt(max_sessions=5))).max_sessions == 5
    for bad in (0, -1, "5", True, 2.5):
        refusal = auth.authenticate(bearer(make_jwt(max_sessions=bad)))
        assert refusal.status == 401 and "max_sessions" in refusal.reason


def test_a_null_session_limit_claim_is_refused_not_unlimited():
    """Found by a security audit: `"max_sessions": null` read as "no limit" and let a token past
    --max-sessions-per-key (token minters often write null for an optional field)."""
    null_claim = jwt.encode({"sub": "tenant-7", "exp": int(time.time()) + 300, "max_sessions": None}, JWT_SECRET,
                            algorithm="HS256")
    for node_limit in (1, None):
        refusal = authenticator(jwt_secret=JWT_SECRET, max_sessions_per_key=node_limit).authenticate(bearer(null_claim))
        assert (refusal.status, refusal.reason) == (401, "token claim 'max_sessions' must be a positive integer")


def test_jwt_refusals_expired_not_yet_valid_wrong_secret_wrong_alg_missing_claims():
    auth = authenticator(jwt_secret=JWT_SECRET)
    now = int(time.time())
    cases = {
        "token expired": make_jwt(exp=now - 60),
        "token not yet valid": make_jwt(nbf=now + 600),
        "invalid credentials": make_jwt(secret=OTHER_SECRET),
        "token lacks the 'exp' claim": make_jwt(exp=None),
        "token lacks the 'sub' claim": make_jwt(sub=None),
    }
    for reason, token in cases.items():
        refusal = auth.authenticate(bearer(token))
        assert isinstance(refusal, AuthRefusal) and refusal.reason == reason, (reason, refusal)
        assert_secret_free(refusal, token, JWT_SECRET)
    # alg "none" (unsigned) and another HMAC algorithm with the right secret are both refused
    unsigned = jwt.encode({"sub": "tenant-7", "exp": now + 300}, None, algorithm="none")
    with warnings.catch_warnings():  # PyJWT warns that this secret is short for HS512: the point
        warnings.simplefilter("ignore", jwt.warnings.InsecureKeyLengthWarning)
        hs512 = make_jwt(algorithm="HS512")
    for token in (unsigned, hs512, unsigned + "forged", "a.b.c", "not-a-jwt"):
        assert auth.authenticate(bearer(token)).reason == "invalid credentials"
    # control characters (a log line of the token's own), an empty or an over-long subject
    for bad in ("evil\nuser", "a\x1b[2Kb", "", "x" * 257):
        refusal = auth.authenticate(bearer(make_jwt(sub=bad)))
        assert refusal.status == 401 and refusal.reason == "token subject must be 1-256 printable characters", bad


def test_jwt_subjects_as_identity_providers_make_them_are_accepted():
    """Auth0's `auth0|…`, Google's numeric ids, e-mail addresses, spaces, non-ASCII names, 256
    characters: a valid token of any of them is a principal of its own."""
    auth = authenticator(jwt_secret=JWT_SECRET)
    for subject in ("auth0|5f7c8ec7c33c6c004bbafe82", "google-oauth2|104593283648123456789", "jane.doe@example.com",
                    "Jane Doe", "Zoë Ångström", "x" * 256):
        principal = auth.authenticate(bearer(make_jwt(sub=subject)))
        assert principal == Principal(subject, None, None, "jwt"), subject
        assert principal.limit_key == f"jwt:{subject}"


def test_jwt_audience_issuer_and_leeway():
    auth = authenticator(jwt_secret=JWT_SECRET, jwt_audience="realtime", jwt_issuer="https://issuer.test")
    good = make_jwt(aud="realtime", iss="https://issuer.test")
    assert auth.authenticate(bearer(good)).id == "tenant-7"
    assert auth.authenticate(bearer(make_jwt(aud="other", iss="https://issuer.test"))).reason == "token audience mismatch"
    assert auth.authenticate(bearer(make_jwt(aud="realtime", iss="https://evil.test"))).reason == "token issuer mismatch"
    assert auth.authenticate(bearer(make_jwt(iss="https://issuer.test"))).status == 401  # aud required
    # without a configured audience, a token meant for some other audience is not accepted either
    assert authenticator(jwt_secret=JWT_SECRET).authenticate(bearer(make_jwt(aud="other"))).status == 401
    lenient = authenticator(jwt_secret=JWT_SECRET, jwt_leeway_s=120)
    assert lenient.authenticate(bearer(make_jwt(exp=int(time.time()) - 30))).id == "tenant-7"


def test_static_keys_and_jwt_together():
    auth = ClientAuthenticator(parse_api_keys_env(f"svc:{KEY_A}"), jwt_secret=JWT_SECRET)
    assert auth.authenticate(bearer(KEY_A)).method == "api_key"
    assert auth.authenticate(bearer(make_jwt())).method == "jwt"
    assert auth.authenticate(bearer(KEY_B)).status == 401


# ---- token locations ---------------------------------------------------------------------


def test_each_token_location():
    auth = ClientAuthenticator(parse_api_keys_env(f"alice:{KEY_A}"))
    via_header = auth.authenticate(bearer(KEY_A))
    via_query = auth.authenticate(request(f"/realtime?model=gpt-realtime&token={KEY_A}"))
    via_protocol = auth.authenticate(request(headers=[
        ("Sec-WebSocket-Protocol", f"{SUBPROTOCOL}, {BEARER_SUBPROTOCOL_PREFIX}{KEY_A}")]))
    assert via_header == Principal("alice", None, None, "api_key")
    assert via_query == Principal("alice", None, None, "api_key")
    # the browser path: the server echoes the non-secret subprotocol
    assert via_protocol == Principal("alice", None, SUBPROTOCOL, "api_key")
    # two headers instead of one comma-separated list work the same
    split = request(headers=[("Sec-WebSocket-Protocol", f"{BEARER_SUBPROTOCOL_PREFIX}{KEY_A}"),
                             ("Sec-WebSocket-Protocol", SUBPROTOCOL)])
    assert auth.authenticate(split).subprotocol == SUBPROTOCOL
    # a percent-encoded query token is decoded
    assert auth.authenticate(request("/realtime?token=test%2Dclient%2Dkey%2D1")).id == "alice"


def test_malformed_credentials_are_refused_with_a_clear_reason():
    auth = ClientAuthenticator(parse_api_keys_env(f"alice:{KEY_A}"))
    cases = {
        "missing credentials": [request(), bearer(""), request("/realtime?token=")],
        "Authorization scheme must be Bearer": [request(headers=[("Authorization", f"Basic {KEY_A}")]),
                                                request(f"/realtime?token={KEY_A}",
                                                        headers=[("Authorization", KEY_A)])],
        "more than one Authorization header": [request(headers=[("Authorization", f"Bearer {KEY_A}")] * 2)],
        "more than one token parameter": [request(f"/realtime?token={KEY_A}&token={KEY_A}")],
        f"offer subprotocol '{SUBPROTOCOL}' with the bearer subprotocol": [
            request(headers=[("Sec-WebSocket-Protocol", f"{BEARER_SUBPROTOCOL_PREFIX}{KEY_A}")])],
        "credentials too long": [bearer("k" * 9000)],
    }
    for reason, requests in cases.items():
        for req in requests:
            refusal = auth.authenticate(req)
            assert isinstance(refusal, AuthRefusal) and refusal.status == 401 and refusal.reason == reason
            assert_secret_free(refusal, KEY_A)


def test_header_takes_precedence_over_subprotocol_and_query():
    auth = ClientAuthenticator(parse_api_keys_env(f"alice:{KEY_A},bob:{KEY_B}"))
    req = request(f"/realtime?token={KEY_B}", headers=[
        ("Authorization", f"Bearer {KEY_A}"),
        ("Sec-WebSocket-Protocol", f"{SUBPROTOCOL},{BEARER_SUBPROTOCOL_PREFIX}{KEY_B}")])
    assert auth.authenticate(req) == Principal("alice", None, SUBPROTOCOL, "api_key")
    assert extract_credentials(request(f"/realtime?token={KEY_B}"))[0] == KEY_B


def test_auth_disabled_gives_anonymous_and_the_open_relay_warning():
    auth = authenticator()
    assert not auth.enabled
    assert auth.authenticate(request()) == Principal("anonymous", None, None, "anonymous")
    browser = request(headers=[("Sec-WebSocket-Protocol", SUBPROTOCOL)])
    assert auth.authenticate(browser).subprotocol == SUBPROTOCOL
    for host in ("0.0.0.0", "::", "", "10.1.2.3", "gateway.internal"):
        warning = auth.auth_warning(host)
        assert warning is not None and "AUTH IS DISABLED" in warning
    for host in ("127.0.0.1", "127.0.0.53", "::1", "[::1]", "localhost"):
        assert auth.auth_warning(host) is None and is_loopback_host(host)
    assert ClientAuthenticator(parse_api_keys_env(KEY_A)).auth_warning("0.0.0.0") is None


def test_authenticate_never_raises_and_never_leaks(caplog):
    auth = ClientAuthenticator(parse_api_keys_env(f"alice:{KEY_A}"), jwt_secret=JWT_SECRET)
    broken = request()
    broken.path = None  # a request object the code cannot parse at all
    caplog.set_level(logging.DEBUG)
    with_secret = request(f"/realtime?token={KEY_A}")
    with_secret.headers = None
    for req in (broken, with_secret):
        refusal = auth.authenticate(req)
        assert refusal.status == 401 and refusal.reason == "invalid credentials"
    assert KEY_A not in caplog.text and JWT_SECRET not in caplog.text
    for token in (KEY_A, make_jwt(), make_jwt(secret=OTHER_SECRET), make_jwt(exp=1)):
        result = auth.authenticate(bearer(token))
        assert_secret_free(result, token, JWT_SECRET, KEY_A)
    assert_secret_free(auth, KEY_A, JWT_SECRET)
    assert_secret_free(AuthSettings(api_keys=KEY_A, jwt_secret=JWT_SECRET), KEY_A, JWT_SECRET)


def test_redact_path_hides_only_the_token():
    assert redact_path(f"/realtime?model=gpt-realtime&token={KEY_A}".encode()) == \
        "/realtime?model=gpt-realtime&token=[redacted]"
    assert redact_path(b"/realtime") == "/realtime"
    assert KEY_A not in redact_path(f"/realtime?token={KEY_A}&token={KEY_A}")


# ---- origins -----------------------------------------------------------------------------


def test_origin_exact_and_wildcard_rules():
    policy = OriginPolicy(["https://app.example.com", "https://*.example.org", "*.example.net",
                           "http://localhost:5173"])
    allowed = ["https://app.example.com", "https://APP.example.com:443", "https://a.example.org",
               "https://a.b.example.org", "https://x.example.net", "http://x.example.net",
               "http://localhost:5173", None]
    refused = ["http://app.example.com", "https://app.example.com:8443", "https://example.org",
               "https://evil-example.org", "https://example.org.evil.com", "https://a.example.org:444",
               "https://example.net", "ftp://x.example.net", "http://localhost:5174", "http://localhost",
               "null", "", "https://app.example.com/path", "https://user@app.example.com", "garbage",
               "https://[evil", "http://[::1", "https://app.example.com]"]
    for origin in allowed:
        assert policy.allows(origin), origin
    for origin in refused:
        assert not policy.allows(origin), origin


def test_origin_policy_defaults_and_request_checks():
    deny_all = OriginPolicy([])
    assert deny_all.allows(None) and not deny_all.allows("https://app.example.com")
    assert OriginPolicy(["*"]).allows("https://anything.test")
    assert OriginPolicy(["null"]).allows("null")
    policy = OriginPolicy(["https://app.example.com"])
    assert policy.check(request())  # no Origin: a non-browser client
    assert policy.check(request(headers=[("Origin", "https://app.example.com")]))
    assert not policy.check(request(headers=[("Origin", "https://evil.test")]))
    assert not policy.check(request(headers=[("Origin", "https://app.example.com")] * 2))
    assert OriginPolicy.refusal.status == 403
    for bad in ("https://", "https://a.*.example.com", "https://*", "https://x.com:99999"):
        with pytest.raises(ConfigError):
            OriginPolicy([bad])


# ---- session limits ----------------------------------------------------------------------


def test_limiter_global_limit_503_and_release():
    limiter = SessionLimiter(max_sessions=2)
    first, second = limiter.acquire("a", "10.0.0.1"), limiter.acquire("b", "10.0.0.2")
    assert isinstance(first, Slot) and isinstance(second, Slot) and limiter.active == 2
    refused = limiter.acquire("c", "10.0.0.3")
    assert isinstance(refused, LimitRefusal)
    assert (refused.status, refused.code, refused.scope) == (503, "Overloaded", "global")
    assert limiter.refused == {"global": 1, "key": 0, "ip": 0} and limiter.active == 2
    first.release()
    assert isinstance(limiter.acquire("c", "10.0.0.3"), Slot)


def test_limiter_per_key_and_per_ip_429():
    limiter = SessionLimiter(max_sessions=100, max_per_ip=2)
    slots = [limiter.acquire("alice", "10.0.0.1", key_limit=2), limiter.acquire("alice", "10.0.0.2", key_limit=2)]
    refused = limiter.acquire("alice", "10.0.0.3", key_limit=2)
    assert (refused.status, refused.scope) == (429, "key")
    slots.append(limiter.acquire("bob", "10.0.0.1"))
    assert isinstance(slots[-1], Slot)  # another key is unaffected
    refused = limiter.acquire("carol", "10.0.0.1")
    assert (refused.status, refused.scope, refused.code) == (429, "ip", "Overloaded")
    slots.append(limiter.acquire("carol", None))
    assert isinstance(slots[-1], Slot)  # no address known: no per-IP check
    assert limiter.active_for_key("alice") == 2 and limiter.active_for_ip("10.0.0.1") == 2
    slots[0].release()
    assert limiter.active_for_key("alice") == 1 and limiter.active_for_ip("10.0.0.1") == 1
    assert limiter.check("alice", "10.0.0.1", key_limit=2) is None
    assert limiter.refused == {"global": 0, "key": 1, "ip": 1}


def test_slot_release_is_idempotent_and_leaves_no_entries():
    limiter = SessionLimiter(max_sessions=1, max_per_ip=1)
    for _round in range(1000):  # far more than the limits: no slot is ever leaked (WaaV B1)
        slot = limiter.acquire("alice", "10.0.0.1", key_limit=1)
        assert isinstance(slot, Slot)
        assert slot.release() is True
        assert slot.release() is False and slot.released
    assert limiter.active == 0 and limiter._per_key == {} and limiter._per_ip == {}
    with limiter.acquire("alice", "10.0.0.1") as slot:
        assert limiter.active == 1
    assert limiter.active == 0 and slot.released
    slot.release()
    assert limiter.active == 0


def test_slot_released_on_exception_and_on_garbage_collection(caplog):
    limiter = SessionLimiter(max_sessions=1)
    with pytest.raises(RuntimeError):
        with limiter.acquire("alice", "10.0.0.1"):
            raise RuntimeError("session crashed")
    assert limiter.active == 0
    caplog.set_level(logging.WARNING, "gateway.auth")
    limiter.acquire("alice", "10.0.0.1")  # dropped without release: a bug the limiter survives
    gc.collect()
    assert limiter.active == 0 and "never released" in caplog.text


def test_limiter_rejects_nonsense_limits():
    for kwargs in ({"max_sessions": 0}, {"max_per_ip": -1}):
        with pytest.raises(ConfigError):
            SessionLimiter(**kwargs)


def test_client_ip_trusts_forwarded_for_only_from_trusted_proxies():
    headers = CIMultiDict([("X-Forwarded-For", "203.0.113.9, 10.0.0.5")])
    assert client_ip("198.51.100.1", headers) == "198.51.100.1"  # no trusted proxy: header ignored
    assert client_ip("198.51.100.1", headers, ["10.0.0.0/8"]) == "198.51.100.1"  # peer not a proxy
    assert client_ip("10.0.0.2", headers, ["10.0.0.0/8"]) == "203.0.113.9"
    spoof = CIMultiDict([("X-Forwarded-For", "1.1.1.1, 203.0.113.9")])  # client wrote 1.1.1.1 itself
    assert client_ip("10.0.0.2", spoof, ["10.0.0.0/8"]) == "203.0.113.9"
    assert client_ip("10.0.0.2", CIMultiDict([("X-Forwarded-For", "junk")]), ["10.0.0.0/8"]) == "10.0.0.2"
    assert client_ip("10.0.0.2", CIMultiDict(), ["10.0.0.0/8"]) == "10.0.0.2"


def test_forwarded_address_takes_ports_and_ipv6_brackets_off():
    """Found by an auth audit: behind a trusted proxy that writes ``ip:port`` or ``[v6]``, every
    client counted against the proxy's own address, so they all shared one per-IP bucket."""
    parsed = {
        "203.0.113.9": "203.0.113.9", " 203.0.113.9 ": "203.0.113.9", "3.3.3.3:5555": "3.3.3.3",
        "2001:db8::1": "2001:db8::1", "2001:DB8:0::1": "2001:db8::1", "[2001:db8::1]": "2001:db8::1",
        "[2001:db8::1]:443": "2001:db8::1", "[::1]:0": "::1",
    }
    for hop, address in parsed.items():
        assert forwarded_address(hop) == address, hop
    garbage = ["", "unknown", "_hidden", "proxy.example.com", "proxy.example.com:80", "3.3.3.3:", "3.3.3.3:x",
               "3.3.3.3:65536", "3.3.3.3:+80", "3.3.3.3:٣", "3.3.3.3:5555:1", "[2001:db8::1", "[2001:db8::1]443",
               "[2001:db8::1]:", "[2001:db8::1]:99999", "[3.3.3.3]", "[3.3.3.3]:80", "2001:db8::1:443:",
               "[]", "[]:80", "1.2.3", "999.1.1.1", "[[2001:db8::1]]"]
    for hop in garbage:
        assert forwarded_address(hop) is None, hop


def test_limit_address_counts_ipv6_per_64_and_mapped_ipv4_as_ipv4():
    assert limit_address("203.0.113.9") == "203.0.113.9"
    assert limit_address("::ffff:203.0.113.9") == "203.0.113.9"  # a dual-stack socket's IPv4 peer
    same_host = {limit_address(ip) for ip in ("2001:db8:0:1::1", "2001:db8:0:1:ffff:ffff:ffff:ffff",
                                              "2001:DB8:0:1:a:b:c:d")}
    assert same_host == {"2001:db8:0:1::/64"}
    assert limit_address("2001:db8:0:2::1") == "2001:db8:0:2::/64"
    assert limit_address("::1") == "::/64"
    assert limit_address(None) is None
    assert limit_address("unix-peer") == "unix-peer"


def test_client_ip_reads_forwarded_ports_and_brackets_and_still_falls_back_on_garbage():
    proxies = ["10.0.0.0/8"]

    def via_proxy(value: str) -> str | None:
        return client_ip("10.0.0.2", CIMultiDict([("X-Forwarded-For", value)]), proxies)

    assert via_proxy("3.3.3.3:5555") == "3.3.3.3"
    assert via_proxy("[2001:db8::1]") == "2001:db8::1"
    assert via_proxy("[2001:db8::1]:443, 10.0.0.7:8080") == "2001:db8::1"  # a trusted hop with a port
    assert via_proxy("1.1.1.1, 3.3.3.3:5555") == "3.3.3.3"  # still the right-most untrusted entry
    for garbage in ("3.3.3.3:x", "[2001:db8::1", "unknown", "1.1.1.1, [3.3.3.3]:80", "host:80"):
        assert via_proxy(garbage) == "10.0.0.2", garbage  # counted against the proxy, not trusted
    # without a trusted peer the header still means nothing, whatever its form
    assert client_ip("198.51.100.1", CIMultiDict([("X-Forwarded-For", "3.3.3.3:5555")]), proxies) == "198.51.100.1"


# ---- over a real socket: the wiring the server will use ---------------------------------


class _Listener(WSListener):
    def __init__(self, events: list) -> None:
        self.events = events

    def on_ws_connected(self, transport) -> None:
        self.events.append("connected")

    def on_ws_frame(self, transport, frame) -> None:
        if frame.msg_type is WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport) -> None:
        self.events.append("disconnected")


def test_refusals_and_subprotocol_echo_over_real_sockets():
    """A picows server wired as recommended: origin -> auth -> 101 echoing the subprotocol."""
    auth = ClientAuthenticator(parse_api_keys_env(f"alice:{KEY_A}"))
    origins = OriginPolicy(["https://app.example.com"])
    events: list = []

    def factory(req):
        if not origins.check(req):
            return OriginPolicy.refusal.to_response()
        principal = auth.authenticate(req)
        if isinstance(principal, AuthRefusal):
            return principal.to_response()
        headers = {"Sec-WebSocket-Protocol": principal.subprotocol} if principal.subprotocol else None
        return WSUpgradeResponseWithListener(WSUpgradeResponse.create_101_response(extra_headers=headers),
                                             _Listener(events))

    async def raw_get(port: int, path: str, headers: str = "") -> tuple[int, bytes, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n".encode())
        await writer.drain()
        data = await reader.read()
        writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), head, body

    async def scenario():
        server = await ws_create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            status, head, body = await raw_get(port, f"/realtime?token={KEY_B}")
            assert status == 401 and b'WWW-Authenticate: Bearer realm="realtime-gateway"' in head
            assert orjson.loads(body) == {"error": {"code": "Unauthorized", "message": "invalid credentials"}}
            status, _, body = await raw_get(port, "/realtime", "Origin: https://evil.test\r\n")
            assert status == 403 and b"origin not allowed" in body
            # a browser-style client: the echoed subprotocol completes the handshake
            async with websockets.connect(
                    f"ws://127.0.0.1:{port}/realtime", origin="https://app.example.com",
                    subprotocols=[SUBPROTOCOL, BEARER_SUBPROTOCOL_PREFIX + KEY_A]) as ws:
                assert ws.subprotocol == SUBPROTOCOL
                assert KEY_A not in str(ws.response.headers)
            async with websockets.connect(f"ws://127.0.0.1:{port}/realtime",
                                          additional_headers={"Authorization": f"Bearer {KEY_A}"}) as ws:
                assert ws.subprotocol is None
            # an authorised plain HTTP GET (no Upgrade headers): picows calls the factory, refuses
            # the upgrade itself and never calls on_ws_connected / on_ws_disconnected. So a session
            # slot must be taken in on_ws_connected, not in the factory, or it would leak here.
            before = list(events)
            status, _, _ = await raw_get(port, f"/realtime?token={KEY_A}")
            assert status == 400
            assert events == before
        finally:
            server.close()
            await server.wait_closed()
        assert events.count("connected") == 2

    run(scenario(), timeout=10)


def test_shared_limiter_counts_across_instances_and_forgets_a_dead_worker(tmp_path):
    """Two workers' limiters over one file act as one node: the node limit, a key's limit and an
    address's limit hold across them; a dead worker's rows are removed by `forget_worker`."""
    from gateway.auth import SharedSessionLimiter, forget_worker
    path = str(tmp_path / "sessions.sqlite")
    one, two = SharedSessionLimiter(path, max_sessions=3, max_per_ip=2), SharedSessionLimiter(path, 3, 2)
    a = one.acquire("key-a", "10.0.0.1", key_limit=1)
    assert isinstance(a, Slot)
    assert two.acquire("key-a", "10.0.0.2", key_limit=1).scope == "key"
    b = two.acquire("key-b", "10.0.0.1")
    assert isinstance(b, Slot)
    assert two.acquire("key-c", "10.0.0.1").scope == "ip"
    c = one.acquire("key-c", "10.0.0.3")
    assert two.acquire("key-d", "10.0.0.4").scope == "global"
    a.release()
    assert isinstance(two.acquire("key-a", "10.0.0.2", key_limit=1), Slot)
    forget_worker(path, os.getpid())  # both "workers" here share this pid: all their rows go
    assert isinstance(one.acquire("key-e", "10.0.0.1"), Slot)
    b.release()  # releases after a forget never take a count below zero
    c.release()
    assert one.check("key-f", "10.0.0.1") is None
