"""`p2pfed verify`: check every signature, hash and envelope in the shared storage."""
from __future__ import annotations

from dataclasses import dataclass

from .crypto import Identity, open_record, sha256_hex, verify_envelope
from . import layout
from .errors import IntegrityError, P2PFedError
from .federation import Federation
from .layout import kind_of
from .objects import read_envelope, read_record
from .protocol.contribution import parse_commit


@dataclass
class Finding:
    key: str
    ok: bool
    detail: str
    disagreement: bool = False  # sites computed different merges: a person must look (exit 7)


def verify_storage(fed: Federation, reader: Identity | None, progress=None) -> list[Finding]:
    """One finding per object. Envelopes are decrypted (plaintext hash checked) when
    `reader` is among their recipients, else their signature and binding are checked.
    Each object is downloaded once: what commits and seals list is checked at the end
    against the hashes of the objects as they were read."""
    keys = [k for k in fed.storage.list_prefix("") if not k.startswith("probe/")]
    findings, hashes, listed, merges = {}, {}, [], {}
    for key in keys:
        if progress:
            progress(key)
        try:
            data = fed.storage.get(key)
            hashes[key] = sha256_hex(data)
            findings[key] = Finding(key, True, _check(fed, key, data, reader, listed, merges))
        except P2PFedError as exc:
            findings[key] = Finding(key, False, exc.message)
    for key, ref_key, sha in listed:
        if hashes.get(ref_key) != sha and findings[key].ok:
            findings[key] = Finding(key, False, f"{key}: lists {ref_key}, which is missing or differs")
    _compare_merges(merges, findings)
    return list(findings.values())


def _compare_merges(merges: dict[str, str], findings: dict[str, Finding]) -> None:
    """Every site's merge record of a round must hold the same result: sites that hold
    different models (a fork) fail verify even when every object is validly signed."""
    by_round: dict[int, dict[str, str]] = {}
    for key, result in merges.items():
        if findings[key].ok:
            by_round.setdefault(layout.round_of(key), {})[key] = result
    for r, results in sorted(by_round.items()):
        if len(set(results.values())) > 1:
            summary = ", ".join(f"{kind_of(k)[2]}: {str(v)[:12]}" for k, v in sorted(results.items()))
            for key in results:
                findings[key] = Finding(key, False, f"round {r}: sites merged differently ({summary})", True)


def _check(fed: Federation, key: str, data: bytes, reader: Identity | None, listed: list, merges: dict) -> str:
    kind = kind_of(key)
    if kind is None:
        raise IntegrityError(f"{key}: not an object of the p2pfed protocol")
    name, envelope, author = kind
    if name in ("federation", "epoch", "approval", "join"):
        return _check_membership(fed, key, name, author, data)
    if not envelope:
        body = read_record(fed, key, name, author, data=data)
        listed.extend((key, ref_key, sha) for ref_key, sha in _references(key, name, author, body))
        if name == "merged":
            merges[key] = body.get("result")
        return f"{name} record, signed by {author or 'a member'}"
    header = verify_envelope(data, authors=fed.authors(key), name=key,
                             expect={"federation": fed.id, "kind": name, "name": key, "author": author})
    # a shard is named by its plaintext sha256, which its author signed in the header
    if name == "shard" and layout.shard_plain_sha256(key) != header.get("plaintext_sha256"):
        raise IntegrityError(f"{key}: content does not match its name")
    # only what was encrypted to this site's current keys: a rotated key is gone
    if reader is not None and reader.site in header.get("recipients", {}) \
            and fed.authors(key).get(reader.site) == reader.public():
        read_envelope(fed, key, name, reader, author, blob=data)  # decrypts, checks that hash
        return f"{name} envelope, signed by {author}, decrypted and hash-checked"
    return f"{name} envelope, signed by {author} (not encrypted for this site)"


def _references(key: str, kind: str, author: str | None, body: dict) -> list[tuple[str, str]]:
    """(key, sha256) of the objects a commit or a seal vouches for: all must be there.
    A malformed commit or seal raises, naming itself."""
    r = layout.round_of(key)
    if kind == "commit":
        commit = parse_commit(author, r, body)
        return [(ref.key, ref.sha256) for ref in (*commit.shards, commit.meta)]
    if kind == "seal":
        contributions = body.get("contributions")
        if not isinstance(contributions, dict) or not all(isinstance(v, str) for v in contributions.values()):
            raise IntegrityError(f"{key}: malformed seal")
        return [(layout.commit(r, site), sha) for site, sha in contributions.items()]
    return []


def _check_membership(fed: Federation, key: str, kind: str, site: str | None, data: bytes) -> str:
    # federation.load verified federation.json and the membership chain; what it left out is named here
    if key in fed.log.ignored:
        raise IntegrityError(fed.log.ignored[key])
    if kind == "join":
        # the keys it joined with: those of the epoch that admitted it (they may be rotated since)
        ident = next((e.members[site] for e in fed.log.chain if site in e.members), None) or fed.pending.get(site)
        if ident is None:
            raise IntegrityError(f"{key}: join request is not validly self-signed")
        open_record(data, authors={site: ident}, name=key,
                    expect=fed.expect("join", site=site, name=key, author=site))
    return "membership record, verified"
