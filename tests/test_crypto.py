"""Envelopes and signed records: what they accept and everything they must refuse."""
from __future__ import annotations

import json

import pytest

from p2pfed import crypto
from p2pfed.crypto import Identity
from p2pfed.errors import IntegrityError

A, B, C = (Identity.generate(s) for s in ("a", "b", "c"))
MEMBERS = {i.site: i.public() for i in (A, B)}
HEADER = {"federation": "f1", "kind": "shard", "name": "rounds/00001/a/x.shard", "round": 1}


def seal(payload=b"hello weights", chunk_size=crypto.CHUNK_SIZE, author=A, recipients=MEMBERS):
    return crypto.seal(payload, header=HEADER, author=author, recipients=recipients, chunk_size=chunk_size)


def open_(blob, reader=B, expect=None):
    return crypto.open_sealed(blob, reader=reader, authors=MEMBERS, name="obj",
                              expect=HEADER if expect is None else expect)


@pytest.mark.parametrize("size,chunk", [(0, 16), (1, 16), (16, 16), (17, 16), (1000, 64)])
def test_roundtrip_across_chunk_boundaries(size, chunk):
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    header, plain = open_(seal(payload, chunk))
    assert plain == payload and header["author"] == "a" and header["plaintext_size"] == size


def test_every_flipped_byte_is_detected():
    blob = seal(b"x" * 100, chunk_size=32)
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x01
        with pytest.raises(IntegrityError):
            open_(bytes(bad))


def test_truncated_or_extended_ciphertext_is_refused():
    blob = seal(b"y" * 100, chunk_size=32)
    for bad in (blob[:-1], blob[:-48], blob + b"\0", blob[:40]):
        with pytest.raises(IntegrityError):
            open_(bad)


def test_not_for_this_reader_and_not_from_a_member():
    with pytest.raises(IntegrityError, match="not encrypted for site 'c'"):
        crypto.open_sealed(seal(), reader=C, authors={**MEMBERS, "c": C.public()}, name="obj")
    with pytest.raises(IntegrityError, match="not a member"):
        open_(seal(author=C, recipients={**MEMBERS, "c": C.public()}))


def test_binding_fields_stop_replay_elsewhere():
    blob = seal()
    for field, value in [("round", 2), ("federation", "other"), ("name", "rounds/00002/a/x.shard")]:
        with pytest.raises(IntegrityError, match=field):
            open_(blob, expect={**HEADER, field: value})


def test_key_substitution_is_caught_by_signature():
    """A member re-signs nothing: swapping in another author's name breaks the signature."""
    blob = bytearray(seal())
    i = blob.index(b'"author":"a"')
    blob[i + 10:i + 11] = b"b"
    with pytest.raises(IntegrityError, match="bad signature"):
        open_(bytes(blob))


def test_unknown_version_and_oversized_header():
    blob = bytearray(seal())
    blob[4] = 99
    with pytest.raises(IntegrityError, match="unsupported envelope version"):
        open_(bytes(blob))
    blob = bytearray(seal())
    blob[6:10] = (crypto.MAX_HEADER + 1).to_bytes(4, "big")
    with pytest.raises(IntegrityError, match="out of bounds"):
        open_(bytes(blob))


def test_signed_records():
    data = crypto.sign_record({"kind": "seal", "round": 3}, A)
    assert crypto.open_record(data, authors=MEMBERS, name="r", expect={"round": 3}) == (
        {"kind": "seal", "round": 3}, "a")
    with pytest.raises(IntegrityError, match="expected 4"):
        crypto.open_record(data, authors=MEMBERS, name="r", expect={"round": 4})
    with pytest.raises(IntegrityError, match="bad signature"):
        crypto.open_record(data.replace(b'"round":3', b'"round":4'), authors=MEMBERS, name="r")
    with pytest.raises(IntegrityError, match="not a member"):
        crypto.open_record(crypto.sign_record({"x": 1}, C), authors=MEMBERS, name="r")
    forged = data.replace(b'"signer":"a"', b'"signer":"b"')
    with pytest.raises(IntegrityError, match="bad signature"):
        crypto.open_record(forged, authors=MEMBERS, name="r")


def test_fingerprint_is_stable_and_key_dependent():
    pub = A.public()
    assert pub.fingerprint() == crypto.PublicIdentity.from_json(pub.to_json()).fingerprint()
    assert pub.fingerprint() != B.public().fingerprint() and len(pub.fingerprint()) == 64


@pytest.mark.parametrize("recipients", [["b"], "b", {"b": 1}, None])
def test_a_member_signed_header_with_malformed_recipients_is_refused(recipients):
    """A member signs an envelope whose recipients are not a map of site -> wrapped key:
    an integrity error, never an AttributeError or a substring 'membership' test."""
    blob = seal()
    _, version, suite, hlen = crypto.PREFIX.unpack_from(blob)
    head = json.loads(blob[crypto.PREFIX.size:crypto.PREFIX.size + hlen])
    raw = crypto.canonical_json({**head, "recipients": recipients})
    prefix = crypto.PREFIX.pack(crypto.MAGIC, version, suite, len(raw)) + raw
    forged = prefix + A.sign(crypto.ENVELOPE_DOMAIN + prefix) + blob[crypto.PREFIX.size + hlen + crypto.SIG_LEN:]
    with pytest.raises(IntegrityError, match=r"^obj: envelope header\.recipients(\.b)?: expected (an object|a string)"):
        open_(forged)
