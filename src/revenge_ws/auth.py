"""Tokens (contract §6): verification with PyJWT, and minting for development.

The algorithm is pinned by configuration; PyJWT is told to require ``exp`` and ``sub``
(it accepts tokens without ``exp`` unless asked), ``nbf`` is always checked, ``aud`` and
``iss`` only when configured. Error messages name the reason and never the token.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass
from typing import Any

import jwt

from .config import HMAC_ALGORITHMS, JwtSettings
from .exceptions import AuthError, ConfigError

__all__ = ["Claims", "TokenVerifier", "mint_token"]


@dataclass(frozen=True, slots=True)
class Claims:
    """The verified claims of one token."""

    sub: str
    exp: float
    iat: float | None = None
    name: str | None = None
    role: str = "user"
    #: Library ids the user may see; ``None`` = all libraries.
    libraries: frozenset[str] | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def expires_at_ms(self) -> float:
        return self.exp * 1000.0

    @property
    def display_name(self) -> str:
        return self.name or self.sub

    def may_see_library(self, library_id: str) -> bool:
        return self.libraries is None or library_id in self.libraries


def _read_key(path: Any) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read key file {path}: {exc.strerror}") from None


#: Verified tokens remembered per process. Clients present the same token on every
#: reconnect (a restart's reconnect storm presents thousands at once), and PyJWT's
#: parse + signature check was 9-21 % of a handshake's CPU (docs/performance.md).
VERIFIED_CACHE_SIZE = 4096


class TokenVerifier:
    """Verifies tokens with the one algorithm the deployment pinned.

    Successful verifications are remembered by the SHA-256 of the token (not the
    token itself, which stays out of memory dumps), at most
    :data:`VERIFIED_CACHE_SIZE`, oldest dropped first. A remembered token is still
    refused once ``exp`` (+ leeway) has passed; ``nbf`` had already passed when it was
    verified. Only successes are remembered, so a forged token costs a full check every
    time and cannot evict anything but the oldest entry.
    """

    def __init__(self, settings: JwtSettings) -> None:
        self._settings = settings
        self._alg = settings.algorithm
        if self._alg in HMAC_ALGORITHMS:
            assert settings.secret is not None
            self._key: Any = settings.secret.get_secret_value()
        else:
            self._key = _read_key(settings.public_key_file)
        self._options: Any = {
            "require": ["exp", "sub"],
            "verify_aud": settings.audience is not None,
            "verify_iss": settings.issuer is not None,
        }
        self._verified: dict[bytes, Claims] = {}

    def verify(self, token: str) -> Claims:
        """Return the token's claims or raise :class:`AuthError` (``UNAUTHORIZED``)."""
        if not token:
            raise AuthError("missing token")
        if len(token) > self._settings.max_token_bytes:
            raise AuthError("token too large")
        digest = hashlib.sha256(token.encode()).digest()
        known = self._verified.get(digest)
        if known is not None:
            if time.time() >= known.exp + self._settings.leeway:  # as PyJWT decides
                del self._verified[digest]
                raise AuthError("token expired", expired=True)
            return known
        claims = self._decode(token)
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            del self._verified[next(iter(self._verified))]
        self._verified[digest] = claims
        return claims

    def _decode(self, token: str) -> Claims:
        try:
            payload = jwt.decode(
                token,
                self._key,
                algorithms=[self._alg],
                audience=self._settings.audience,
                issuer=self._settings.issuer,
                leeway=self._settings.leeway,
                options=self._options,
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired", expired=True) from None
        except jwt.ImmatureSignatureError:
            raise AuthError("token not yet valid (nbf)") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"token lacks the required '{exc.claim}' claim") from None
        except jwt.InvalidAudienceError:
            raise AuthError("wrong audience") from None
        except jwt.InvalidIssuerError:
            raise AuthError("wrong issuer") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError(f"algorithm not allowed (this hub accepts {self._alg})") from None
        except jwt.InvalidSignatureError:
            raise AuthError("bad signature") from None
        except jwt.InvalidTokenError as exc:
            # DecodeError and friends: the message is PyJWT's, it never echoes the token.
            raise AuthError(f"malformed token: {exc}") from None
        return _claims(payload)


def _claims(payload: dict[str, Any]) -> Claims:
    sub = payload.get("sub")
    if not isinstance(sub, str) or not sub or len(sub) > 128 or ":" in sub:
        raise AuthError("'sub' must be a non-empty string without ':' (at most 128 characters)")
    role = payload.get("role", "user")
    if role not in ("admin", "user"):
        raise AuthError("'role' must be 'admin' or 'user'")
    libs = payload.get("libraries")
    libraries: frozenset[str] | None = None
    if libs is not None:
        if not isinstance(libs, list) or not all(isinstance(x, str) for x in libs):
            raise AuthError("'libraries' must be a list of strings")
        libraries = frozenset(libs)
    name = payload.get("name")
    iat = payload.get("iat")
    return Claims(
        sub=sub,
        exp=float(payload["exp"]),
        iat=float(iat) if isinstance(iat, int | float) else None,
        name=name if isinstance(name, str) else None,
        role=role,
        libraries=libraries,
    )


def mint_token(
    settings: JwtSettings,
    sub: str,
    *,
    role: str = "user",
    name: str | None = None,
    libraries: list[str] | None = None,
    ttl: float = 3600.0,
    now: float | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """Sign a token with the configured key (development and tests)."""
    t = time.time() if now is None else now
    payload: dict[str, Any] = {"sub": sub, "iat": int(t), "exp": int(t + ttl), "role": role}
    if name:
        payload["name"] = name
    if libraries is not None:
        payload["libraries"] = libraries
    if settings.audience:
        payload["aud"] = settings.audience
    if settings.issuer:
        payload["iss"] = settings.issuer
    payload.update(extra or {})
    if settings.algorithm in HMAC_ALGORITHMS:
        if settings.secret is None:
            raise ConfigError("REVENGE_JWT_SECRET is not set")
        key: Any = settings.secret.get_secret_value()
    else:
        if settings.private_key_file is None:
            raise ConfigError(
                "minting needs REVENGE_JWT_PRIVATE_KEY_FILE with an asymmetric algorithm"
            )
        key = _read_key(settings.private_key_file)
    return jwt.encode(payload, key, algorithm=settings.algorithm)


def check_api_key(presented: str, keys: list[str]) -> bool:
    """Constant-time comparison against every configured key."""
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(presented.encode(), key.encode())
    return ok
