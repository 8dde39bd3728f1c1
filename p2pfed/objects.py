"""Reading and writing the federation's stored objects, bound to where they live.

Every object (record or envelope) signs the federation id, its kind and its own
storage key ("name"), so nothing can be replayed into another place, round or
federation. Kinds by key pattern are listed in `p2pfed.layout.KINDS` (docs/design.md, "Bucket tree").

What a member signed is still untrusted: every record body and JSON payload is checked
against its schema (`p2pfed.schema`) before use. A failure names the member; in a
contribution (meta, summary, histogram) it is a ContributionRejected, which every site
handles the same way."""
from __future__ import annotations

from typing import Any, Mapping

from . import crypto, layout, schema
from .crypto import Identity
from .errors import ContributionRejected, IntegrityError, SetupError
from .faults import after_write
from .federation import Federation

# Kinds whose failure rejects a member's contribution rather than stopping the reader.
CONTRIBUTIONS = ("meta", "shard", "summary", "histogram", "commit", "declaration")
# A commit's body is checked by protocol.contribution.parse_commit (schema.RECORDS["commit"]):
# a malformed commit is a rejected contribution, named while the round waits, never a halt.
_BODY_CHECKED_LATER = ("commit",)


def _invalid(kind: str, key: str, author: str):
    """The error for content `author` signed that breaks its schema."""
    if kind in CONTRIBUTIONS:
        return lambda message, hint=None: ContributionRejected(f"site {author!r}: {message}", hint)
    return lambda message, hint=None: IntegrityError(
        f"{message} (signed by member {author!r})",
        f"member {author!r} runs a broken or patched node; alert its operators")


def _check_size(key: str, kind: str, data: bytes) -> None:
    """Never write what readers refuse to download (layout.KINDS caps)."""
    cap = layout.max_size(key)
    if len(data) > cap:
        raise SetupError(f"{key}: this site's {kind} is {len(data)} bytes, more than the {cap} bytes "
                         "every reader accepts", "see docs/design.md section 4.5 for the size caps")


def _expect(fed: Federation, key: str, kind: str, author: str | None) -> dict:
    want = fed.expect(kind, name=key)
    if author is not None:
        want["author"] = author
    return want


def put_record(fed: Federation, key: str, kind: str, body: Mapping[str, Any], author: Identity,
               at: str | None = None) -> bytes:
    """Sign and create-only write a plaintext record (at `key`, or at `at`, one of its
    slots: the record names its logical key). Returns the stored bytes."""
    data = crypto.sign_record({**body, "federation": fed.id, "kind": kind, "name": key,
                               "author": author.site}, author)
    _check_size(key, kind, data)
    fed.storage.put_new(at or key, data)
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
    if kind not in _BODY_CHECKED_LATER:
        schema.check(schema.RECORDS[kind], body, f"{key}: body", _invalid(kind, key, signer))
    return body


def put_envelope(fed: Federation, key: str, kind: str, payload: bytes, author: Identity,
                 recipients: Mapping[str, crypto.PublicIdentity] | None = None, at: str | None = None,
                 **binding) -> bytes:
    """Encrypt for every member (or `recipients`), sign, create-only write (at `key` or at
    `at`, one of its slots). Returns the blob."""
    blob = crypto.seal(payload, header={**binding, "federation": fed.id, "kind": kind, "name": key},
                       author=author, recipients=recipients or fed.members)
    _check_size(key, kind, blob)
    fed.storage.put_new(at or key, blob)
    after_write()
    return blob


def read_envelope(fed: Federation, key: str, kind: str, reader: Identity, author: str | None = None,
                  blob: bytes | None = None, **binding) -> tuple[dict, bytes]:
    """(header, plaintext) of a verified envelope; a JSON payload is checked against its
    schema too (`read_json` returns it parsed)."""
    header, plain, _ = _open(fed, key, kind, reader, author, blob, binding)
    return header, plain


def read_json(fed: Federation, key: str, kind: str, reader: Identity, author: str | None = None,
              blob: bytes | None = None, **binding) -> tuple[dict, Any]:
    """(header, parsed payload) of a verified envelope of a JSON kind, checked against its schema."""
    header, _, value = _open(fed, key, kind, reader, author, blob, binding)
    return header, value


def _open(fed, key, kind, reader, author, blob, binding) -> tuple[dict, bytes, Any]:
    blob = fed.storage.get(key) if blob is None else blob
    header, plain = crypto.open_sealed(blob, reader=reader, authors=fed.authors(key), name=key,
                                       expect={**_expect(fed, key, kind, author), **binding})
    if kind not in schema.PAYLOADS:  # shards: checked by p2pfed.shards as they are parsed
        return header, plain, None
    return header, plain, _parse_payload(kind, key, plain, _invalid(kind, key, header["author"]))


def _parse_payload(kind: str, key: str, plain: bytes, error) -> Any:
    value = schema.strict_json(plain, f"{key}: payload", max_bytes=schema.PAYLOAD_MAX_BYTES[kind],
                               canonical=b"", error=error)
    schema.check(schema.PAYLOADS[kind], value, f"{key}: payload", error)
    return value
