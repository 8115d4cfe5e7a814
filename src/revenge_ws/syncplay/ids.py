"""Where SyncPlay's identifiers, invitation codes and salts come from, and room passwords.

The engine draws every id, code and salt from an injected :class:`IdSource`, so tests are
deterministic; :data:`SECURE_IDS` (backed by :mod:`secrets`) is the production one and this
module is the only place of the SyncPlay package that uses a random source."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Final, Protocol

from .model import DEFAULT_SETTINGS, INVITE_ALPHABET, INVITE_LENGTH, Settings

# --------------------------------------------------------------------------- randomness


class IdSource(Protocol):
    """Where the engine gets identifiers and salts (injected so tests are deterministic)."""

    def new_id(self) -> str:
        """A fresh, unguessable id (rooms, chat messages)."""
        ...

    def invite_code(self) -> str:
        """A fresh invitation code: ``INVITE_LENGTH`` characters of ``INVITE_ALPHABET``."""
        ...

    def salt(self) -> bytes:
        """A fresh password salt (16 random bytes)."""
        ...


class SecureIds:
    """The production :class:`IdSource`, backed by :mod:`secrets`."""

    def new_id(self) -> str:
        return secrets.token_urlsafe(12)

    def invite_code(self) -> str:
        return "".join(secrets.choice(INVITE_ALPHABET) for _ in range(INVITE_LENGTH))

    def salt(self) -> bytes:
        return secrets.token_bytes(16)


SECURE_IDS: Final = SecureIds()


def hash_password(password: str, salt: bytes, settings: Settings = DEFAULT_SETTINGS) -> str:
    """Hash a room password with scrypt; the result names its parameters and salt."""
    n, r, p = settings.scrypt_n, settings.scrypt_r, settings.scrypt_p
    dk = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=32, maxmem=1 << 27)
    return f"scrypt${n}${r}${p}${salt.hex()}${dk.hex()}"


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches ``encoded`` (constant-time compare; False if malformed)."""
    try:
        algo, n_s, r_s, p_s, salt_hex, dk_hex = encoded.split("$")
        n, r, p = int(n_s), int(r_s), int(p_s)
        salt, expected = bytes.fromhex(salt_hex), bytes.fromhex(dk_hex)
    except ValueError:
        return False
    # Bounds keep a corrupted record from turning a join into a memory bomb.
    if algo != "scrypt" or not (2 <= n <= 1 << 20 and 1 <= r <= 32 and 1 <= p <= 16):
        return False
    dk = hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, dklen=len(expected), maxmem=1 << 27
    )
    return hmac.compare_digest(dk, expected)
