"""Reading and writing the federation's stored objects, bound to where they live.

Every object (record or envelope) signs the federation id, its kind and its own
storage key ("name"), so nothing can be replayed into another place, round or
federation. Kinds by key pattern are listed in `p2pfed.layout.KINDS` (docs/design.md, "Bucket tree")."""
from __future__ import annotations

from typing import Any, Mapping

from . import crypto
from .crypto import Identity
from .errors import IntegrityError
from .faults import after_write
from .federation import Federation

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
    body, signer = crypto.open_record(data, authors=fed.authors(key), name=key,
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
    return crypto.open_sealed(blob, reader=reader, authors=fed.authors(key), name=key,
                              expect={**_expect(fed, key, kind, author), **binding})
