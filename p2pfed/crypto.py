"""All cryptography of p2pfed, in one module (docs/design.md, "Envelope" and
"Signed records"). Nothing else imports `cryptography`.

- Identities: Ed25519 (signing) + X25519 (encryption) per site.
- Signed records: canonical JSON body + Ed25519 signature (plaintext, no data statistics).
- Envelopes: a signed header (binds federation, kind, round, name, author, plaintext
  hash, key commitment) + a random content key wrapped per recipient with HPKE (RFC 9180)
  + the payload in AES-256-GCM chunks, STREAM style (counter nonce with a last-chunk
  flag, like age).

Readers verify the signature before decrypting anything and check the plaintext hash
after: AES-GCM is not key-committing, so the signed hash is what pins the plaintext.
The signed key commitment pins the content key: a wrapped key that does not unwrap to
it was put there by the author (the storage cannot change a signed header), which is
`AuthorCheated`, not tampering. Every failure is an IntegrityError that names the object
and says why."""
from __future__ import annotations

import base64
import hashlib
import hmac
import struct
from dataclasses import dataclass
from typing import Any, Mapping

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import schema
from .schema import canonical_json  # the one encoder of canonical JSON (re-exported here)
from .errors import AuthorCheated, IntegrityError

MAGIC = b"P2PF"
FORMAT_VERSION = 2  # 2: the header carries key_commitment
SUITE_ID = 1  # HPKE(X25519, HKDF-SHA256, AES-256-GCM) + AES-256-GCM STREAM + Ed25519 + SHA-256
PREFIX = struct.Struct(">4sBBI")  # magic, version, suite, header length
SIG_LEN = 64
MAX_HEADER = 1 << 20  # a header lists recipients; 1 MiB is thousands of sites
CHUNK_SIZE = 1 << 20
TAG_LEN = 16
ENVELOPE_DOMAIN = b"p2pfed-envelope-v1\x00"
RECORD_DOMAIN = b"p2pfed-record-v1\x00"
KEYWRAP_INFO = b"p2pfed-keywrap-v1\x00"
KEY_COMMITMENT_INFO = b"p2pfed-key-commitment-v1"
_HPKE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
_RAW = dict(encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_json(obj: Any) -> str:
    """sha256 (hex) of an object's canonical JSON: how plans and merge results are compared."""
    return sha256_hex(canonical_json(obj))


def model_hash(shard_hashes) -> str:
    """A model's identity: the hash of its list of shard hashes (docs/design.md)."""
    return hash_json(list(shard_hashes))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str, name: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raise IntegrityError(f"{name}: malformed base64 field") from None


def grouped(hex_digits: str) -> str:
    """'2ff7a303...' -> '2ff7 a303 ...' (input is accepted with or without the spaces)."""
    return " ".join(hex_digits[i:i + 4] for i in range(0, len(hex_digits), 4))


# --------------------------------------------------------------------------- identities
@dataclass(frozen=True)
class PublicIdentity:
    """What a member publishes: its name and two raw 32-byte public keys."""

    site: str
    verify_key: bytes
    encrypt_key: bytes

    def fingerprint(self) -> str:
        """64 hex digits that sites compare out of band before admitting each other."""
        return sha256_hex(b"p2pfed-id-v1\x00" + self.verify_key + self.encrypt_key)

    def fingerprint_text(self) -> str:
        """The fingerprint as people read it aloud: 16 groups of 4 hex digits."""
        return grouped(self.fingerprint())

    def to_json(self) -> dict:
        return {"site": self.site, "ed25519": _b64(self.verify_key),
                "x25519": _b64(self.encrypt_key)}

    @classmethod
    def from_json(cls, obj: Mapping, name: str = "member record") -> "PublicIdentity":
        try:
            ident = cls(str(obj["site"]), _unb64(obj["ed25519"], name), _unb64(obj["x25519"], name))
        except (KeyError, TypeError):
            raise IntegrityError(f"{name}: public identity is incomplete") from None
        if len(ident.verify_key) != 32 or len(ident.encrypt_key) != 32:
            raise IntegrityError(f"{name}: public keys must be 32 bytes")
        return ident


@dataclass(frozen=True)
class Identity:
    """A site's private keys. Stored by p2pfed.site as two PEM files, mode 0600."""

    site: str
    signing_key: Ed25519PrivateKey
    encryption_key: X25519PrivateKey

    @classmethod
    def generate(cls, site: str) -> "Identity":
        return cls(site, Ed25519PrivateKey.generate(), X25519PrivateKey.generate())

    def public(self) -> PublicIdentity:
        return PublicIdentity(self.site, self.signing_key.public_key().public_bytes(**_RAW),
                              self.encryption_key.public_key().public_bytes(**_RAW))

    def private_pems(self) -> tuple[bytes, bytes]:
        fmt = dict(encoding=serialization.Encoding.PEM,
                   format=serialization.PrivateFormat.PKCS8,
                   encryption_algorithm=serialization.NoEncryption())
        return self.signing_key.private_bytes(**fmt), self.encryption_key.private_bytes(**fmt)

    @classmethod
    def from_pems(cls, site: str, signing_pem: bytes, encryption_pem: bytes) -> "Identity":
        sk = serialization.load_pem_private_key(signing_pem, password=None)
        ek = serialization.load_pem_private_key(encryption_pem, password=None)
        if not isinstance(sk, Ed25519PrivateKey) or not isinstance(ek, X25519PrivateKey):
            raise ValueError("unexpected key type")
        return cls(site, sk, ek)

    def sign(self, data: bytes) -> bytes:
        return self.signing_key.sign(data)


def _verify(ident: PublicIdentity, signature: bytes, data: bytes, name: str) -> None:
    try:
        Ed25519PublicKey.from_public_bytes(ident.verify_key).verify(signature, data)
    except InvalidSignature:
        raise IntegrityError(f"{name}: bad signature (claims to be from {ident.site})") from None


# --------------------------------------------------------------------------- signed records
def sign_record(body: Mapping, author: Identity) -> bytes:
    """A plaintext signed record: JSON {"body", "signer", "signature"}."""
    signed = canonical_json({"body": body, "signer": author.site})
    sig = author.sign(RECORD_DOMAIN + signed)
    return canonical_json({"body": body, "signer": author.site, "signature": _b64(sig)}) + b"\n"


def record_signer(data: bytes, name: str) -> str:
    """Who claims to have signed a record (to pick the key); nothing is trusted yet."""
    return _parse_record(data, name)[1]


def _parse_record(data: bytes, name: str) -> tuple[dict, str, bytes]:
    """Strict parse (UTF-8, no NaN, no duplicate keys, depth and size caps, canonical
    bytes) before the signature is checked: no parser error can escape as a crash."""
    obj = schema.strict_json(data, name, max_bytes=MAX_HEADER, canonical=b"\n")
    schema.check(schema.SIGNED_RECORD, obj, f"{name}: signed record", IntegrityError)
    return obj["body"], obj["signer"], _unb64(obj["signature"], name)


def open_record(data: bytes, *, authors: Mapping[str, PublicIdentity], name: str,
                expect: Mapping[str, Any] | None = None) -> tuple[dict, str]:
    """Verify a signed record against the pinned keys; return (body, signer).

    `expect` lists body fields that must have exactly these values (federation, kind,
    round, site...): this is what stops an object being replayed elsewhere."""
    body, signer, sig = _parse_record(data, name)
    if signer not in authors:
        raise IntegrityError(f"{name}: signed by {signer!r}, who is not a member")
    _verify(authors[signer], sig, RECORD_DOMAIN + canonical_json({"body": body, "signer": signer}), name)
    _check_expected(body, expect or {}, name)
    return body, signer


def _check_expected(fields: Mapping, expect: Mapping, name: str) -> None:
    for key, want in expect.items():
        if fields.get(key) != want:
            raise IntegrityError(f"{name}: field {key!r} is {fields.get(key)!r}, expected {want!r}")


# --------------------------------------------------------------------------- envelopes
def key_commitment(key: bytes) -> str:
    """HMAC-SHA256(content key, "p2pfed-key-commitment-v1") in hex: signed in the header,
    so every recipient can check that it unwrapped the one key the author committed to."""
    return hmac.new(key, KEY_COMMITMENT_INFO, hashlib.sha256).hexdigest()


def _nonce(counter: int, last: bool) -> bytes:
    return counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def seal(payload: bytes, *, header: Mapping[str, Any], author: Identity,
         recipients: Mapping[str, PublicIdentity], chunk_size: int = CHUNK_SIZE) -> bytes:
    """Encrypt `payload` for `recipients` and sign it as `author`.

    `header` carries the binding fields (federation, kind, round, name, ...); this
    function adds author, sizes, plaintext hash and the wrapped keys."""
    key = AESGCM.generate_key(bit_length=256)
    wrapped = {site: _b64(_HPKE.encrypt(key, X25519PublicKey.from_public_bytes(pub.encrypt_key),
                                        info=KEYWRAP_INFO + site.encode()))
               for site, pub in sorted(recipients.items())}
    full = dict(header, author=author.site, plaintext_sha256=sha256_hex(payload),
                plaintext_size=len(payload), chunk_size=chunk_size, recipients=wrapped,
                key_commitment=key_commitment(key))
    head = canonical_json(full)
    if len(head) > MAX_HEADER:
        raise ValueError("envelope header too large")
    prefix = PREFIX.pack(MAGIC, FORMAT_VERSION, SUITE_ID, len(head)) + head
    signature = author.sign(ENVELOPE_DOMAIN + prefix)
    aad = hashlib.sha256(prefix).digest()
    aead = AESGCM(key)
    parts = [prefix, signature]
    n_chunks = max(1, -(-len(payload) // chunk_size))
    view = memoryview(payload)
    for i in range(n_chunks):
        chunk = view[i * chunk_size:(i + 1) * chunk_size]
        parts.append(aead.encrypt(_nonce(i, i == n_chunks - 1), chunk, aad))
    return b"".join(parts)


def envelope_max_bytes(payload_max: int) -> int:
    """The largest envelope of a payload of at most `payload_max` bytes: prefix, the
    largest header, signature, and one tag per chunk (storage caps, p2pfed.layout)."""
    return PREFIX.size + MAX_HEADER + SIG_LEN + payload_max + TAG_LEN * max(1, -(-payload_max // CHUNK_SIZE))


def read_header(blob: bytes, name: str) -> dict:
    """Parse (not verify) an envelope header: format checks first, size capped."""
    if len(blob) < PREFIX.size + SIG_LEN:
        raise IntegrityError(f"{name}: truncated envelope")
    magic, version, suite, hlen = PREFIX.unpack_from(blob)
    if magic != MAGIC:
        raise IntegrityError(f"{name}: not a p2pfed envelope")
    if version != FORMAT_VERSION or suite != SUITE_ID:
        raise IntegrityError(f"{name}: unsupported envelope version {version} suite {suite}",
                             "upgrade p2pfed on this site")
    if hlen > MAX_HEADER or len(blob) < PREFIX.size + hlen + SIG_LEN:
        raise IntegrityError(f"{name}: envelope header length {hlen} is out of bounds")
    header = schema.strict_json(blob[PREFIX.size:PREFIX.size + hlen], f"{name}: envelope header",
                                max_bytes=MAX_HEADER, canonical=b"")
    schema.check(schema.ENVELOPE_HEADER, header, f"{name}: envelope header", IntegrityError)
    return header


def verify_envelope(blob: bytes, *, authors: Mapping[str, PublicIdentity], name: str,
                    expect: Mapping[str, Any] | None = None) -> dict:
    """Check format, author membership, signature and binding fields. No decryption."""
    header = read_header(blob, name)
    author = header["author"]
    if author not in authors:
        raise IntegrityError(f"{name}: signed by {author!r}, who is not a member")
    end = PREFIX.size + PREFIX.unpack_from(blob)[3]
    _verify(authors[author], blob[end:end + SIG_LEN], ENVELOPE_DOMAIN + blob[:end], name)
    _check_expected(header, expect or {}, name)
    return header


def _unwrap(wrapped: str, reader: Identity) -> bytes | None:
    """The content key wrapped for `reader`, or None if it does not unwrap."""
    try:
        key = _HPKE.decrypt(base64.b64decode(wrapped, validate=True), reader.encryption_key,
                            info=KEYWRAP_INFO + reader.site.encode())
    except (InvalidTag, ValueError, TypeError):
        return None
    return key if len(key) == 32 else None


def open_sealed(blob: bytes, *, reader: Identity, authors: Mapping[str, PublicIdentity],
                name: str, expect: Mapping[str, Any] | None = None) -> tuple[dict, bytes]:
    """Verify, then decrypt. Returns (header, plaintext)."""
    header = verify_envelope(blob, authors=authors, name=name, expect=expect)
    wrapped = header["recipients"].get(reader.site)
    if wrapped is None:
        raise IntegrityError(f"{name}: not encrypted for site {reader.site!r}",
                             "the object predates this site's admission, or was made for another federation")
    try:
        size, chunk, want = int(header["plaintext_size"]), int(header["chunk_size"]), header["plaintext_sha256"]
    except (ValueError, KeyError, TypeError):
        raise IntegrityError(f"{name}: envelope header lacks its sizes or plaintext hash") from None
    commitment = header.get("key_commitment")
    if not isinstance(commitment, str):
        raise IntegrityError(f"{name}: envelope header lacks a key commitment")
    key = _unwrap(wrapped, reader)
    if key is None or not hmac.compare_digest(key_commitment(key).encode(), commitment.encode()):
        raise AuthorCheated(header["author"], reader.site, name)
    end = PREFIX.size + PREFIX.unpack_from(blob)[3]
    aad = hashlib.sha256(blob[:end]).digest()
    body = memoryview(blob)[end + SIG_LEN:]
    n_chunks = max(1, -(-size // chunk)) if chunk > 0 else 0
    if chunk <= 0 or len(body) != size + n_chunks * TAG_LEN:
        raise IntegrityError(f"{name}: ciphertext length does not match the header")
    aead, out, step = AESGCM(key), [], chunk + TAG_LEN
    try:
        for i in range(n_chunks):
            out.append(aead.decrypt(_nonce(i, i == n_chunks - 1), body[i * step:(i + 1) * step], aad))
    except InvalidTag:
        raise IntegrityError(f"{name}: ciphertext chunk {i} fails authentication") from None
    plaintext = b"".join(out)
    if sha256_hex(plaintext) != want:
        raise IntegrityError(f"{name}: plaintext hash does not match the signed header")
    return header, plaintext


# --------------------------------------------------------------------------- secure aggregation
# The primitives of p2pfed/secagg.py (docs/design.md 7.8): X25519 agreements expanded by
# HKDF into ChaCha20 mask keys, Shamir shares (pycryptodome) of the mask secrets, and HPKE
# to hand each share to its one holder. Every label binds federation, epoch, round and sites.
MASK_INFO = b"p2pfed-secagg-mask-v1\x00"
SHARE_INFO = b"p2pfed-secagg-share-v1\x00"
COMMIT_INFO = b"p2pfed-secagg-commit-v1\x00"
SEED_BYTES = 16  # the self-mask seed: one Shamir secret (GF(2^128))


def mask_keypair() -> tuple[bytes, bytes]:
    """(private, public) raw 32-byte X25519 keys: a site's mask key for one round."""
    private = X25519PrivateKey.generate()
    return private.private_bytes_raw(), private.public_key().public_bytes(**_RAW)


def mask_public(private: bytes) -> bytes:
    """The public key of a raw X25519 private key: how a reconstructed key is checked."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(**_RAW)


def _hkdf(secret: bytes, info: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def pair_mask_key(private: bytes, their_public: bytes, context: bytes) -> bytes:
    """The ChaCha20 key two sites share for their pairwise mask: X25519, then HKDF bound to
    `context` (federation, epoch, round and both site names, in name order)."""
    shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(their_public))
    return _hkdf(shared, MASK_INFO + b"pair\x00" + context)


def self_mask_key(seed: bytes, context: bytes) -> bytes:
    """The ChaCha20 key of a site's self mask, from its seed (HKDF bound to `context`)."""
    return _hkdf(seed, MASK_INFO + b"self\x00" + context)


def keystream_u64(key: bytes, label: bytes, start: int, count: int):
    """`count` uint64 words of the ChaCha20 stream of (key, label), from word `start` on:
    seekable (a 64-byte block is 8 words), so any slice of a tensor is masked on its own.
    The 12-byte nonce is the label's sha256 prefix; the block counter starts at start // 8."""
    import numpy as np
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    if count == 0:
        return np.zeros(0, dtype=np.uint64)
    block, skip = divmod(start, 8)
    words = skip + count
    if block + -(-words // 8) > 1 << 32:
        raise ValueError("a mask stream holds at most 2^35 words per tensor")
    nonce = block.to_bytes(4, "little") + hashlib.sha256(label).digest()[:12]
    enc = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
    return np.frombuffer(enc.update(bytes(8 * words)), dtype="<u8")[skip:]


def random_seed() -> bytes:
    import os

    return os.urandom(SEED_BYTES)


def split_secret(secret: bytes, threshold: int, holders: int) -> list[bytes]:
    """Shamir shares of a 16- or 32-byte secret (pycryptodome, GF(2^128); a 32-byte secret
    is two 16-byte halves shared alike): share i (0-based) belongs to holder index i + 1."""
    from Crypto.Protocol.SecretSharing import Shamir

    halves = [secret[i:i + 16] for i in range(0, len(secret), 16)]
    if len(secret) not in (16, 32):
        raise ValueError("a secret is 16 or 32 bytes")
    split = [Shamir.split(threshold, holders, half, ssss=False) for half in halves]
    return [b"".join(s[i][1] for s in split) for i in range(holders)]


def combine_secret(shares: Mapping[int, bytes]) -> bytes:
    """The secret from shares {holder index (1-based): share}, at least the threshold."""
    from Crypto.Protocol.SecretSharing import Shamir

    size = {len(s) for s in shares.values()}.pop()
    return b"".join(Shamir.combine([(i, s[h:h + 16]) for i, s in sorted(shares.items())], ssss=False)
                    for h in range(0, size, 16))


def commitment(context: bytes, *parts: bytes) -> str:
    """sha256 (hex) of a secret or share with its context: what a dealer signs so that a
    reconstructed seed, or a share someone reveals, is checked (length-prefixed parts)."""
    h = hashlib.sha256(COMMIT_INFO + context)
    for part in parts:
        h.update(len(part).to_bytes(4, "big") + part)
    return h.hexdigest()


def encrypt_share(share: bytes, recipient: PublicIdentity, context: bytes) -> str:
    """A share for its one holder: HPKE to the holder's key, bound to `context` and the holder."""
    return _b64(_HPKE.encrypt(share, X25519PublicKey.from_public_bytes(recipient.encrypt_key),
                              info=SHARE_INFO + context + b"\x00" + recipient.site.encode()))


def decrypt_share(sealed: str, reader: Identity, context: bytes) -> bytes | None:
    """The share sealed for `reader`, or None if it does not open (its dealer's fault)."""
    try:
        return _HPKE.decrypt(base64.b64decode(sealed, validate=True), reader.encryption_key,
                             info=SHARE_INFO + context + b"\x00" + reader.site.encode())
    except (InvalidTag, ValueError, TypeError):
        return None


def b64(data: bytes) -> str:
    return _b64(data)


def unb64(text: str, name: str) -> bytes:
    return _unb64(text, name)
