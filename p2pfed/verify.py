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
from .protocol.modes import mode_of


@dataclass
class Finding:
    key: str
    ok: bool
    detail: str
    disagreement: bool = False  # sites computed different merges: a person must look (exit 7)


def verify_storage(fed: Federation, reader: Identity | None, progress=None) -> list[Finding]:
    """One finding per object. Envelopes are decrypted (plaintext hash checked) when
    `reader` is among their recipients, else their signature and binding are checked.
    Each object is downloaded once: what commits, seals and merge records list is checked
    at the end against the hashes of the objects as they were read; then the whole hash
    chain of seals and merge records, and every participant's merges, are compared."""
    keys = [k for k in fed.storage.list_prefix("") if not k.startswith("probe/")]
    findings, stored, listed, chain = {}, {}, [], {}
    for key in keys:
        if progress:
            progress(key)
        try:
            data = fed.storage.get(key)
            stored.setdefault(layout.unslot(key)[0], set()).add(sha256_hex(data))
            findings[key] = Finding(key, True, _check(fed, key, data, reader, listed, chain))
        except P2PFedError as exc:
            findings[key] = Finding(key, False, exc.message)
    for key, ref_key, sha in listed:
        if sha not in stored.get(ref_key, ()) and findings[key].ok:
            findings[key] = Finding(key, False, f"{key}: lists {ref_key}, which is missing or differs")
    _check_chain(fed, _winners(chain, findings), findings)
    return list(findings.values())


def _winners(chain: dict[str, tuple[dict, str]], findings: dict[str, Finding]) -> dict[str, tuple[str, dict, str]]:
    """logical key -> (slot, body, sha256) of the first slot whose object verified, as a tick resolves it."""
    won = {}
    for key in sorted(chain, key=lambda k: layout.unslot(k)[1]):
        logical = layout.unslot(key)[0]
        if findings[key].ok and logical not in won:
            won[logical] = (key, *chain[key])
    return won


def _check_chain(fed: Federation, won: dict, findings: dict[str, Finding]) -> None:
    """Every seal names the previous seal's sha256; every participant's merge record of a
    round names that round's seal and the previous round's result, and all agree."""
    start = won.get(layout.FINGERPRINT_SEAL)
    if start is None:
        return
    first = mode_of(fed.settings).first_round
    previous, result = start[2], None
    for r in range(first, fed.settings.rounds + 1):
        seal = won.get(layout.seal(r))
        if seal is None:
            return
        key, body, sha = seal
        parts = sorted(fed.members_at(r))  # the participants of round r: its epoch's members
        if body.get("author") not in parts:
            findings[key] = Finding(key, False, f"{key}: sealed by {body.get('author')!r}, who is not a participant")
        elif body.get("previous") != previous:
            findings[key] = Finding(key, False, f"round {r}: the seal names previous {str(body.get('previous'))[:16]}"
                                                f", not the seal before it ({previous[:16]})")
        previous, result = sha, _compare_merges(r, sha, result if r > 1 else None, parts, won, findings)


def _compare_merges(r: int, seal: str, previous: str | None, parts, won: dict, findings: dict) -> str | None:
    """The participants' merge records of round r must name `seal`, the previous round's
    result, and hold the same result: sites that hold different models (a fork) fail
    verify even when every object is validly signed. Returns the round's result."""
    records = {s: won[layout.merged(r, s)] for s in parts if layout.merged(r, s) in won}
    seen = {s: tuple(body.get(k) for k in ("result", "seal", "previous")) for s, (_, body, _) in records.items()}
    if len(set(seen.values())) > 1 or any(v[1:] != (seal, previous) for v in seen.values()):
        summary = ", ".join(f"{s}: {str(v[0])[:12]} (seal {str(v[1])[:12]}, previous {str(v[2])[:12]})"
                            for s, v in sorted(seen.items()))
        for key, _, _ in records.values():
            findings[key] = Finding(key, False, f"round {r}: sites merged differently ({summary}; the storage's "
                                                f"seal is {seal[:12]})", True)
    results = {v[0] for v in seen.values()}
    return results.pop() if len(results) == 1 else None


def _check(fed: Federation, key: str, data: bytes, reader: Identity | None, listed: list, chain: dict) -> str:
    kind = kind_of(key)
    if kind is None:
        raise IntegrityError(f"{key}: not an object of the p2pfed protocol")
    name, envelope, author = kind
    logical = layout.unslot(key)[0]  # an object in a slot names its logical key
    if name in ("federation", "epoch", "approval", "join"):
        return _check_membership(fed, key, name, author, data)
    if not envelope:
        body = read_record(fed, logical, name, author, data=data)
        listed.extend((key, ref_key, sha) for ref_key, sha in _references(fed, logical, name, author, body))
        if name in ("fingerprint-seal", "seal", "merged"):
            chain[key] = (body, sha256_hex(data))
        return f"{name} record, signed by {body.get('author')}"
    header = verify_envelope(data, authors=fed.authors(logical), name=logical,
                             expect={"federation": fed.id, "kind": name, "name": logical, "author": author})
    # a shard is named by its plaintext sha256, which its author signed in the header
    if name in ("shard", "masked") and layout.shard_plain_sha256(key) != header.get("plaintext_sha256"):
        raise IntegrityError(f"{key}: content does not match its name")
    # only what was encrypted to this site's current keys: a rotated key is gone
    if reader is not None and reader.site in header.get("recipients", {}) \
            and fed.authors(logical).get(reader.site) == reader.public():
        read_envelope(fed, logical, name, reader, author, blob=data)  # decrypts, checks that hash
        return f"{name} envelope, signed by {author}, decrypted and hash-checked"
    return f"{name} envelope, signed by {author} (not encrypted for this site)"


def _references(fed: Federation, key: str, kind: str, author: str | None, body: dict) -> list[tuple[str, str]]:
    """(logical key, sha256) of the objects a commit, a seal, a key seal or a merge record
    vouches for: all must be there. A malformed commit or seal raises, naming itself."""
    r = layout.round_of(key)
    if kind == "commit":
        commit = parse_commit(author, r, body, "masked" if fed.settings.secure_aggregation and r >= 1 else "shard")
        return [(ref.key, ref.sha256) for ref in (*commit.shards, commit.meta)]
    if kind == "seal":
        contributions = body.get("contributions")
        if not isinstance(contributions, dict) or not all(isinstance(v, str) for v in contributions.values()):
            raise IntegrityError(f"{key}: malformed seal")
        keys = [(layout.key_seal(r), body["keys"])] if "keys" in body else []
        return [(layout.commit(r, site), sha) for site, sha in contributions.items()] + keys
    if kind == "keyseal":
        return [(layout.secagg_keys(r, site), sha) for site, sha in body["keys"].items()]
    if kind == "merged" and isinstance(body.get("reasons"), dict):
        return [(layout.merge_reasons(r, author), str(body["reasons"].get("sha256")))]
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
