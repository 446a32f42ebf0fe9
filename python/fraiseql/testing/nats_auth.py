"""NATS nkeys, JWTs and ``.creds`` files, made locally for tests.

Enough of the nkeys encoding and of the nats-io/jwt v2 claim format to run a
``nats-server`` that authenticates clients by nkey, or in operator mode (a
self-signed operator JWT, an account JWT it signs, a user JWT the account
signs), without ``nsc``:

- an nkey is an Ed25519 key: its public key is base32 of (prefix byte, 32 key
  bytes, CRC16 little-endian), its seed base32 of (two seed prefix bytes,
  32 private bytes, CRC16);
- a JWT is ``base64url(header).base64url(claims).base64url(ed25519 signature)``
  with header ``{"typ":"JWT","alg":"ed25519-nkey"}``, ``iss``/``sub`` public
  keys and a ``jti`` that is base32 of the SHA-512/256 of the standard claims.

Needs ``cryptography`` (a test dependency).
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

__all__ = ["KeyPair", "OperatorMode", "account_jwt", "creds_file_text", "operator_jwt", "user_jwt"]

Kind = Literal["operator", "account", "user"]

_SEED_PREFIX = 18 << 3
_PREFIXES: dict[str, int] = {"operator": 14 << 3, "account": 0, "user": 20 << 3}

# JetStream and connection limits of an account that may do anything (-1: unlimited).
UNLIMITED_ACCOUNT: dict[str, Any] = {
    "subs": -1,
    "data": -1,
    "payload": -1,
    "imports": -1,
    "exports": -1,
    "wildcards": True,
    "conn": -1,
    "leaf": -1,
    "mem_storage": -1,
    "disk_storage": -1,
    "streams": -1,
    "consumer": -1,
}


def _crc16(data: bytes) -> int:
    """CRC-16/XMODEM (polynomial 0x1021, initial 0), as nkeys uses."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def _encode(prefix: bytes, key: bytes) -> str:
    raw = prefix + key
    raw += _crc16(raw).to_bytes(2, "little")
    return base64.b32encode(raw).decode().rstrip("=")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


@dataclass(frozen=True)
class KeyPair:
    """An operator, account or user nkey."""

    kind: Kind
    private_key: Ed25519PrivateKey

    @classmethod
    def create(cls, kind: Kind) -> KeyPair:
        return cls(kind, Ed25519PrivateKey.generate())

    @property
    def public_key(self) -> str:
        """``O…``, ``A…`` or ``U…``: what server configs and JWTs name."""
        raw = self.private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return _encode(bytes([_PREFIXES[self.kind]]), raw)

    @property
    def seed(self) -> str:
        """``SO…``, ``SA…`` or ``SU…``: the secret, as an nkey file or a .creds file holds it."""
        raw = self.private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        prefix = _PREFIXES[self.kind]
        return _encode(bytes([_SEED_PREFIX | prefix >> 5, (prefix & 31) << 3]), raw)

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)


def _jwt(subject: str, issuer: KeyPair, name: str, nats: dict[str, Any]) -> str:
    """Encodes and signs a v2 JWT the way nats-io/jwt does."""
    standard: dict[str, Any] = {
        "iat": int(time.time()),
        "iss": issuer.public_key,
        "name": name,
        "sub": subject,
    }
    digest = hashlib.new("sha512_256", json.dumps(standard, separators=(",", ":")).encode()).digest()
    jti = base64.b32encode(digest).decode().rstrip("=")
    claims = {"jti": jti, **standard, "nats": {**nats, "version": 2}}
    header = _b64url(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}, separators=(",", ":")).encode())
    payload = _b64url(json.dumps(claims, separators=(",", ":")).encode())
    signed = f"{header}.{payload}"
    return f"{signed}.{_b64url(issuer.sign(signed.encode()))}"


def operator_jwt(operator: KeyPair, name: str = "fraiseql-test") -> str:
    """A self-signed operator JWT."""
    return _jwt(operator.public_key, operator, name, {"type": "operator"})


def account_jwt(account: KeyPair, operator: KeyPair, name: str = "APP", *, jetstream: bool = True) -> str:
    """An account JWT signed by ``operator``; JetStream is enabled with no limits unless
    ``jetstream`` is false (then the account has no JetStream at all)."""
    limits = dict(UNLIMITED_ACCOUNT)
    if not jetstream:
        for key in ("mem_storage", "disk_storage", "streams", "consumer"):
            del limits[key]
    return _jwt(account.public_key, operator, name, {"limits": limits, "type": "account"})


def user_jwt(user: KeyPair, account: KeyPair, name: str = "fraiseql") -> str:
    """A user JWT signed by ``account``, with no limits and no permission restrictions."""
    nats = {"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user"}
    return _jwt(user.public_key, account, name, nats)


def creds_file_text(jwt: str, user: KeyPair) -> str:
    """A ``.creds`` file as ``nsc generate creds`` writes it."""
    return (
        f"-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{user.seed}\n------END USER NKEY SEED------\n\n"
        "*************************************************************\n"
    )


@dataclass(frozen=True)
class OperatorMode:
    """An operator, its system account, one application account (JetStream enabled) and
    one user of that account."""

    operator: KeyPair
    system: KeyPair
    account: KeyPair
    user: KeyPair

    @classmethod
    def create(cls) -> OperatorMode:
        return cls(
            KeyPair.create("operator"),
            KeyPair.create("account"),
            KeyPair.create("account"),
            KeyPair.create("user"),
        )

    def server_config(self) -> str:
        """nats-server config lines: trust the operator, preload both accounts (JetStream
        needs a system account)."""
        system = account_jwt(self.system, self.operator, "SYS", jetstream=False)
        app = account_jwt(self.account, self.operator)
        return (
            f"operator: {operator_jwt(self.operator)}\n"
            f"system_account: {self.system.public_key}\n"
            "resolver: MEMORY\n"
            "resolver_preload: {\n"
            f"  {self.system.public_key}: {system}\n"
            f"  {self.account.public_key}: {app}\n"
            "}\n"
        )

    def creds(self) -> str:
        """The user's ``.creds`` file."""
        return creds_file_text(user_jwt(self.user, self.account), self.user)
