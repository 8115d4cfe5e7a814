"""Token refusals (contract §6, RFC 8725): each one is a 401 at the handshake."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from revenge_ws.auth import Claims, TokenVerifier, check_api_key, mint_token
from revenge_ws.config import JwtSettings
from revenge_ws.exceptions import AuthError, ConfigError

from .helpers import SECRET, Hub, make_settings
from .test_ws import UPGRADE

S = JwtSettings.model_validate({"secret": SECRET})


def b64(obj: object) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(obj)).rstrip(b"=").decode()


def forge(payload: dict[str, object], key: str = SECRET, alg: str = "HS256", **hdr: object) -> str:
    return jwt.encode(payload, key, algorithm=alg, headers=hdr or None)


def now() -> int:
    return int(time.time())


def refusal(token: str, settings: JwtSettings = S) -> str:
    with pytest.raises(AuthError) as info:
        TokenVerifier(settings).verify(token)
    return info.value.message


def test_valid_token_claims() -> None:
    tok = mint_token(S, "alice", role="admin", name="Alice", libraries=["l1"])
    c = TokenVerifier(S).verify(tok)
    assert isinstance(c, Claims)
    assert (
        c.sub,
        c.is_admin,
        c.display_name,
        c.may_see_library("l1"),
        c.may_see_library("l2"),
    ) == (
        "alice",
        True,
        "Alice",
        True,
        False,
    )
    assert c.expires_at_ms == c.exp * 1000


def test_alg_none_refused() -> None:
    tok = b64({"alg": "none", "typ": "JWT"}) + "." + b64({"sub": "a", "exp": now() + 60}) + "."
    assert "algorithm" in refusal(tok) or "malformed" in refusal(tok)


def test_hs_rs_confusion_refused(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pub_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pub_file = tmp_path / "pub.pem"
    pub_file.write_bytes(pub_pem)
    rs = JwtSettings.model_validate({"algorithm": "RS256", "public_key_file": str(pub_file)})
    # An attacker signs HS256 with the public key as the HMAC secret.
    header = b64({"alg": "HS256", "typ": "JWT"})
    body = b64({"sub": "a", "exp": now() + 60})
    import hashlib
    import hmac

    sig = hmac.new(pub_pem, f"{header}.{body}".encode(), hashlib.sha256).digest()
    tok = f"{header}.{body}." + base64.urlsafe_b64encode(sig).rstrip(b"=").decode()
    assert "algorithm" in refusal(tok, rs)
    # And an RS256 token is refused by an HS256 deployment.
    rs_tok = jwt.encode({"sub": "a", "exp": now() + 60}, key, algorithm="RS256")
    assert "algorithm" in refusal(rs_tok)
    # While a proper RS256 token passes the RS256 deployment.
    assert TokenVerifier(rs).verify(rs_tok).sub == "a"


def test_asymmetric_minting_with_key_files(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "k.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / "p.pem").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    es = JwtSettings.model_validate(
        {
            "algorithm": "ES256",
            "public_key_file": str(tmp_path / "p.pem"),
            "private_key_file": str(tmp_path / "k.pem"),
        }
    )
    assert TokenVerifier(es).verify(mint_token(es, "bob")).sub == "bob"
    with pytest.raises(ConfigError):
        mint_token(es.model_copy(update={"private_key_file": None}), "bob")


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ({"sub": "a"}, "'exp'"),
        ({"exp": 2_000_000_000}, "'sub'"),
        ({"sub": "a", "exp": 1000}, "expired"),
        ({"sub": "a", "exp": 2_000_000_000, "nbf": 1_999_999_999}, "not yet valid"),
        ({"sub": "", "exp": 2_000_000_000}, "'sub'"),
        ({"sub": "a:b", "exp": 2_000_000_000}, "'sub'"),
        ({"sub": "a", "exp": 2_000_000_000, "role": "root"}, "'role'"),
        ({"sub": "a", "exp": 2_000_000_000, "libraries": "l1"}, "'libraries'"),
    ],
)
def test_claim_refusals(payload: dict[str, object], reason: str) -> None:
    assert reason in refusal(forge(payload))


def test_bad_signature_malformed_oversized_missing() -> None:
    good = mint_token(S, "a")
    assert "signature" in refusal(good[:-3] + ("AAA" if good[-3:] != "AAA" else "BBB"))
    assert "signature" in refusal(forge({"sub": "a", "exp": now() + 60}, key="y" * 40))
    assert "malformed" in refusal("not.a.jwt")
    assert "too large" in refusal("x" * 9000)
    assert "missing" in refusal("")


def test_expired_within_leeway_passes_and_beyond_fails() -> None:
    assert TokenVerifier(S).verify(forge({"sub": "a", "exp": now() - 5})).sub == "a"
    assert "expired" in refusal(forge({"sub": "a", "exp": now() - 60}))


def test_audience_and_issuer() -> None:
    strict = JwtSettings.model_validate({"secret": SECRET, "audience": "revenge", "issuer": "me"})
    ok = {"sub": "a", "exp": now() + 60, "aud": "revenge", "iss": "me"}
    assert TokenVerifier(strict).verify(forge(ok)).sub == "a"
    assert "audience" in refusal(forge({**ok, "aud": "other"}), strict)
    assert "issuer" in refusal(forge({**ok, "iss": "other"}), strict)
    assert "'aud'" in refusal(forge({"sub": "a", "exp": now() + 60, "iss": "me"}), strict)
    # Without a configured audience a token's aud is ignored.
    assert TokenVerifier(S).verify(forge({**ok, "aud": "whatever"})).sub == "a"
    assert mint_token(strict, "x") and TokenVerifier(strict).verify(mint_token(strict, "x"))


def test_api_key_compare() -> None:
    assert check_api_key("k1", ["k0", "k1"])
    assert not check_api_key("k2", ["k0", "k1"])
    assert not check_api_key("k", [])


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (forge({"sub": "a", "exp": 1000}), "expired"),
        (forge({"sub": "a", "exp": now() + 60}, key="z" * 40), "signature"),
        (forge({"sub": "a"}), "exp"),
        (b64({"alg": "none"}) + "." + b64({"sub": "a", "exp": now() + 99}) + ".", ""),
    ],
)
async def test_handshake_refusals_are_401(hub: Hub, token: str, reason: str) -> None:
    s = await hub.session()
    async with s.get(f"{hub.url}/api/v1/ws?token={token}", headers=UPGRADE) as r:
        body = await r.json()
    assert r.status == 401
    assert body["error"]["code"] == "UNAUTHORIZED"
    assert reason in body["error"]["message"]


async def test_wrong_audience_is_401(hub_with: object) -> None:
    async with hub_with({"REVENGE_JWT_AUDIENCE": "revenge"}) as h:  # type: ignore[operator]
        s = await h.session()
        tok = forge({"sub": "a", "exp": now() + 60, "aud": "else"})
        async with s.get(f"{h.url}/api/v1/ws", headers={"Authorization": f"Bearer {tok}"}) as r:
            assert r.status == 401
            assert (await r.json())["error"]["message"] == "wrong audience"


def test_settings_secret_checks() -> None:
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        make_settings({"REVENGE_JWT_SECRET": "short"})


def test_verified_tokens_are_remembered_but_still_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    """A token seen before is not parsed again (reconnect storms), yet once its ``exp``
    (+ leeway) has passed it is refused like any expired token; forged tokens are never
    remembered, and the memory is bounded."""
    import revenge_ws.auth as auth_mod

    v = TokenVerifier(S)
    token = forge({"sub": "alice", "exp": now() + 60})
    calls = 0
    real_decode = jwt.decode

    def counting(*a: object, **kw: object) -> object:
        nonlocal calls
        calls += 1
        return real_decode(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(auth_mod.jwt, "decode", counting)  # PyJWT itself is not faked
    first = v.verify(token)
    assert v.verify(token) is first and calls == 1
    bad = forge({"sub": "alice", "exp": now() + 60}, key="another-secret-" + "y" * 40)
    for _ in range(2):
        with pytest.raises(AuthError):
            v.verify(bad)
    assert calls == 3  # refused twice, checked twice
    later = time.time() + 60 + S.leeway + 1
    monkeypatch.setattr(auth_mod.time, "time", lambda: later)
    with pytest.raises(AuthError) as info:
        v.verify(token)
    assert info.value.expired
    monkeypatch.setattr(auth_mod, "VERIFIED_CACHE_SIZE", 3)
    monkeypatch.setattr(auth_mod.time, "time", _real_time)
    for i in range(10):
        v.verify(forge({"sub": f"u{i}", "exp": now() + 60}))
    assert len(v._verified) <= 3


_real_time = time.time
