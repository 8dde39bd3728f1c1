"""Reading and writing the federation's stored objects, bound to where they live.

Every object (record or envelope) signs the federation id, its kind and its own
storage key ("name"), so nothing can be replayed into another place, round or
federation. Kinds by key pattern are listed in KINDS (docs/design.md, "Bucket tree")."""
from __future__ import annotations

import re
from typing import Any, Mapping

from . import crypto
from .crypto import Identity
from .errors import IntegrityError
from .faults import after_write
from .federation import Federation

# key pattern -> (kind, is_envelope). The first group names the author site.
KINDS: list[tuple[re.Pattern, str, bool]] = [
    (re.compile(r"^fingerprints/([^/]+)/summary\.p2pf$"), "summary", True),
    (re.compile(r"^fingerprints/([^/]+)/histogram\.p2pf$"), "histogram", True),
    (re.compile(r"^fingerprints/SEAL\.json$"), "fingerprint-seal", False),
    (re.compile(r"^plans/([^/]+)\.p2pf$"), "plan", True),
    (re.compile(r"^plans/([^/]+)\.json$"), "plan-hash", False),
    (re.compile(r"^rounds/\d{5}/([^/]+)/[0-9a-f]{64}\.shard$"), "shard", True),
    (re.compile(r"^rounds/\d{5}/([^/]+)/meta\.p2pf$"), "meta", True),
    (re.compile(r"^rounds/\d{5}/([^/]+)/COMMIT\.json$"), "commit", False),
    (re.compile(r"^rounds/\d{5}/SEAL\.json$"), "seal", False),
    (re.compile(r"^rounds/\d{5}/merged/([^/]+)\.json$"), "merged", False),
    (re.compile(r"^final/([^/]+)\.p2pf$"), "final", True),
]


def kind_of(key: str) -> tuple[str, bool, str | None] | None:
    for pattern, kind, envelope in KINDS:
        m = pattern.match(key)
        if m:
            return kind, envelope, (m.group(1) if m.groups() else None)
    return None


def _expect(fed: Federation, key: str, kind: str, author: str | None) -> dict:
    want = fed.expect(kind, name=key)
    if author is not None:
        want["author"] = author
    return want


def put_record(fed: Federation, key: str, kind: str, body: Mapping[str, Any], author: Identity) -> bytes:
    """Sign and create-only write a plaintext record. Returns the stored bytes."""
    data = crypto.sign_record({**body, "federation": fed.id, "kind": kind, "name": key,
                               "author": author.site}, author)
    fed.storage.put_new(key, data)
    after_write()
    return data


def read_record(fed: Federation, key: str, kind: str, author: str | None = None,
                data: bytes | None = None) -> dict:
    """Verified body of a record; `author` pins who must have signed it."""
    data = fed.storage.get(key) if data is None else data
    body, signer = crypto.open_record(data, authors=fed.members, name=key,
                                      expect=_expect(fed, key, kind, author))
    if signer != body.get("author"):
        raise IntegrityError(f"{key}: signed by {signer!r} on behalf of {body.get('author')!r}")
    return body


def put_envelope(fed: Federation, key: str, kind: str, payload: bytes, author: Identity,
                 recipients: Mapping[str, crypto.PublicIdentity] | None = None, **binding) -> bytes:
    """Encrypt for every member (or `recipients`), sign, create-only write. Returns the blob."""
    blob = crypto.seal(payload, header={**binding, "federation": fed.id, "kind": kind, "name": key},
                       author=author, recipients=recipients or fed.members)
    fed.storage.put_new(key, blob)
    after_write()
    return blob


def read_envelope(fed: Federation, key: str, kind: str, reader: Identity, author: str | None = None,
                  blob: bytes | None = None, **binding) -> tuple[dict, bytes]:
    blob = fed.storage.get(key) if blob is None else blob
    return crypto.open_sealed(blob, reader=reader, authors=fed.members, name=key,
                              expect={**_expect(fed, key, kind, author), **binding})
