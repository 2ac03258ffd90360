"""Frame encryption: AES-256-GCM (default) or SM4-GCM, one sub-key per session.

The controller makes a random 32-byte transfer key and hands it to both ends
over SSH (stdin, never argv). Each session (one connection) derives its own
sub-key with HKDF-SHA256 from that key and a random salt the sender puts in
the stream preamble, so a resumed transfer never reuses a (key, nonce) pair.
Nonces are implicit: direction byte + frame sequence number, so a frame that
is dropped, replayed or reordered fails to authenticate like a corrupted one.
"""

from __future__ import annotations

import os
import struct
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vmigrate.errors import UserError

KEY_BYTES: Final = 32
TAG_BYTES: Final = 16
#: Cipher names as the CLI and the preamble spell them, with their wire ids.
CIPHERS: Final[dict[str, int]] = {"aes-256-gcm": 1, "sm4-gcm": 2}
CIPHER_NAMES: Final[dict[int, str]] = {v: k for k, v in CIPHERS.items()}


class AuthError(Exception):
    """A frame did not authenticate (internal; the engine decides what it means)."""


def new_key() -> bytes:
    """A fresh random transfer key."""
    return os.urandom(KEY_BYTES)


def parse_key(text: str) -> bytes:
    """A transfer key from its hex form (64 hex digits); :class:`UserError` otherwise."""
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise UserError(f"a transfer key is {KEY_BYTES * 2} hex digits")
    return key


def available_ciphers() -> list[str]:
    """The ciphers this machine's crypto library provides."""
    out = []
    for name in CIPHERS:
        try:
            FrameCipher(name, new_key(), os.urandom(16)).seal(0, 0, b"", b"x")
        except Exception:  # an OpenSSL without SM4 raises UnsupportedAlgorithm
            continue
        out.append(name)
    return out


class FrameCipher:
    """Seals and opens frames of one session, in one direction each."""

    def __init__(self, name: str, key: bytes, salt: bytes) -> None:
        if name not in CIPHERS:
            raise UserError(f"unknown cipher {name!r}; choose from {', '.join(CIPHERS)}")
        self.name = name
        length = 32 if name == "aes-256-gcm" else 16
        sub = HKDF(
            algorithm=hashes.SHA256(), length=length, salt=salt,
            info=b"vmigrate-transfer-v1 " + name.encode(),
        ).derive(key)
        self._aes = AESGCM(sub) if name == "aes-256-gcm" else None
        self._key = sub

    @staticmethod
    def _nonce(direction: int, seq: int) -> bytes:
        return struct.pack(">B3xQ", direction, seq)

    def seal(self, direction: int, seq: int, aad: bytes, plaintext: bytes) -> bytes:
        """Ciphertext with its 16-byte tag appended."""
        nonce = self._nonce(direction, seq)
        if self._aes is not None:
            return self._aes.encrypt(nonce, plaintext, aad)
        enc = Cipher(algorithms.SM4(self._key), modes.GCM(nonce)).encryptor()
        enc.authenticate_additional_data(aad)
        return enc.update(plaintext) + enc.finalize() + enc.tag

    def open(self, direction: int, seq: int, aad: bytes, sealed: bytes) -> bytes:
        """The plaintext; :class:`AuthError` when the frame does not authenticate."""
        nonce = self._nonce(direction, seq)
        if len(sealed) < TAG_BYTES:
            raise AuthError("frame shorter than its tag")
        try:
            if self._aes is not None:
                return self._aes.decrypt(nonce, sealed, aad)
            dec = Cipher(
                algorithms.SM4(self._key), modes.GCM(nonce, sealed[-TAG_BYTES:])
            ).decryptor()
            dec.authenticate_additional_data(aad)
            return dec.update(sealed[:-TAG_BYTES]) + dec.finalize()
        except InvalidTag as exc:
            raise AuthError("frame does not authenticate") from exc
