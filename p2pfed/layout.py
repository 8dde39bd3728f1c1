"""Every storage key of the protocol is built here, and only here (docs/design.md, "Bucket tree")."""
from __future__ import annotations

import re

from .crypto import envelope_max_bytes
from .schema import PAYLOAD_MAX_BYTES, RECORD_MAX_BYTES

FEDERATION = "federation.json"
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def valid_site(name: str) -> bool:
    return bool(SITE_NAME.match(name)) and ".." not in name


def epoch_proposal(e: int, from_round: int, site: str) -> str:
    return f"epochs/{e:05d}/r{from_round:05d}/{site}.json"


def epoch_approval(e: int, from_round: int, site: str) -> str:
    return f"epochs/{e:05d}/r{from_round:05d}/approvals/{site}.json"


def epoch_of(key: str) -> tuple[str, int, int, str] | None:
    """(kind "epoch" or "approval", epoch number, first round, site) of a membership log
    key or of one of its slots."""
    parsed = kind_of(key)
    if parsed is None or parsed[0] not in ("epoch", "approval"):
        return None
    parts = unslot(key)[0].split("/")
    return parsed[0], int(parts[1]), int(parts[2][1:]), parsed[2]


def join_request(site: str) -> str:
    return f"joins/{site}.json"


def summary(site: str) -> str:
    return f"fingerprints/{site}/summary.p2pf"


def histogram(site: str) -> str:
    return f"fingerprints/{site}/histogram.p2pf"


FINGERPRINT_SEAL = "fingerprints/SEAL.json"


def declaration(site: str, r: int | None = None) -> str:
    """A site's declared case count: at the start, or again in round r when sites join
    then (in the round's folder: encrypted to and signed by that round's members)."""
    return f"declarations/{site}.p2pf" if r is None else f"{round_dir(r)}/{site}/declaration.p2pf"


def plan(site: str) -> str:
    return f"plans/{site}.p2pf"


def plan_hash(site: str) -> str:
    return f"plans/{site}.json"


def round_dir(r: int) -> str:
    return f"rounds/{r:05d}"


def shard(r: int, site: str, sha256: str) -> str:
    return f"{round_dir(r)}/{site}/{sha256}.shard"


def meta(r: int, site: str) -> str:
    return f"{round_dir(r)}/{site}/meta.p2pf"


def commit(r: int, site: str) -> str:
    return f"{round_dir(r)}/{site}/COMMIT.json"


def seal(r: int) -> str:
    return f"{round_dir(r)}/SEAL.json"


def secagg_keys(r: int, site: str) -> str:
    """A site's key material for secure aggregation in round r (docs/design.md 7.8)."""
    return f"{round_dir(r)}/{site}/keys.p2pf"


def key_seal(r: int) -> str:
    """Which sites' key material round r masks with: sealed before anyone masks."""
    return f"{round_dir(r)}/KEYS.json"


def masked(r: int, site: str, sha256: str) -> str:
    """A shard of masked fixed-point words, named by the sha256 of its plaintext. Outside
    the round's folder: a sharded round has one per slice and site, N^2 objects, which no
    tick lists (readers take their keys from the commits)."""
    return f"masked/{r:05d}/{site}/{sha256}.masked"


def reveal(r: int, site: str) -> str:
    """What `site` reveals once round r is sealed: the shares that remove the masks."""
    return f"{round_dir(r)}/{site}/reveal.p2pf"


def slice_sum(r: int, j: int, site: str) -> str:
    """Sharded aggregation: the mean of slice j of round r as `site` summed it."""
    return f"{round_dir(r)}/_slices/{j:05d}/{site}.p2pf"


def slice_hash(r: int, j: int, site: str) -> str:
    """The signed plaintext hash of `site`'s sum of slice j (what sites compare)."""
    return f"{round_dir(r)}/_slices/{j:05d}/{site}.json"


def merged(r: int, site: str) -> str:
    return f"{round_dir(r)}/merged/{site}.json"


def merge_reasons(r: int, site: str) -> str:
    return f"{round_dir(r)}/merged/{site}.reasons.p2pf"


def handover(r: int, publisher: str, newcomer: str) -> str:
    """The record listing what `publisher` hands a site admitted from round r + 1."""
    return f"{round_dir(r)}/{publisher}/handover-{newcomer}.json"


def handover_shard(r: int, publisher: str, newcomer: str, sha256: str) -> str:
    return f"{round_dir(r)}/{publisher}/handover-{newcomer}/{sha256}.shard"


def handover_fingerprint(r: int, publisher: str, newcomer: str) -> str:
    return f"{round_dir(r)}/{publisher}/handover-{newcomer}/fingerprint.p2pf"


def handover_for(key: str) -> str | None:
    """The newcomer a handover object is for (its only reader), or None."""
    m = re.match(r"^rounds/\d{5}/[^/]+/handover-([^/]+?)(?:\.json|/.*)$", key)
    return m.group(1) if m else None


def final_metrics(site: str) -> str:
    return f"final/{site}.p2pf"


# -- slots: squat-proof create-only keys (docs/design.md 7.2) -------------------------------
# A fixed-name object K may live at K, K.1, ..., K.7: a writer takes the first slot that is
# free (or holds its own object), a reader the first slot whose object verifies. Anyone
# can write junk at a predictable key; it then costs one slot, never the federation.
MAX_SLOTS = 8
SLOTTED = {"fingerprint-seal", "summary", "histogram", "declaration", "plan", "plan-hash", "meta", "commit",
           "seal", "merged", "reasons", "final", "complaint", "handover", "handover-fingerprint", "epoch",
           "approval", "keys", "keyseal", "reveal", "slice", "slice-hash"}
_SLOT = re.compile(r"^(.+)\.([1-9])$")


def slot(key: str, i: int) -> str:
    return key if i == 0 else f"{key}.{i}"


def unslot(key: str) -> tuple[str, int]:
    """(logical key, slot number) of a stored key; a key of a kind without slots is slot 0."""
    m = _SLOT.match(key)
    if m and int(m.group(2)) < MAX_SLOTS:
        parsed = _kind(m.group(1))
        if parsed and parsed[0] in SLOTTED:
            return m.group(1), int(m.group(2))
    return key, 0


def round_of(key: str) -> int | None:
    m = re.match(r"^(?:rounds|masked)/(\d{5})/", key)
    return int(m.group(1)) if m else None


def folder(key: str) -> str:
    """The prefix a tick lists once to learn which keys near `key` exist: a round's
    folder (a site's masked shards of a round: their own), or the first path component
    (epochs, fingerprints, plans, final)."""
    if key.startswith("masked/"):
        return key.rsplit("/", 1)[0]
    r = round_of(key)
    return round_dir(r) if r is not None else key.split("/", 1)[0] if "/" in key else ""


COMPLAINTS = "_complaints"  # starts with "_": no site can have that name


def complaint(key: str, recipient: str) -> str:
    """Where `recipient` complains about the envelope at `key`: in the folder a tick
    already lists to find that object's neighbours, so others see it at no extra cost."""
    where = folder(key)
    return f"{where}/{COMPLAINTS}/{recipient}.json" if where else f"{COMPLAINTS}/{recipient}.json"


# key pattern -> (kind, is_envelope, size cap in bytes). The group, if any, names the author
# site. Caps are checked before download (storage.get): a record's is RECORD_MAX_BYTES; an
# envelope's is its payload cap (schema.PAYLOAD_MAX_BYTES: a shard's tensor data, the
# FFE limits on cases, channels and bins) plus the largest header, signature and tags.
_RECORD = RECORD_MAX_BYTES


def _envelope(kind: str) -> int:
    return envelope_max_bytes(PAYLOAD_MAX_BYTES[kind])


KINDS: list[tuple[re.Pattern, str, bool, int]] = [
    (re.compile(r"^(?:.+/)?_complaints/([^/]+)\.json$"), "complaint", False, _RECORD),  # first: it sits among others
    (re.compile(r"^federation\.json$"), "federation", False, _RECORD),
    (re.compile(r"^epochs/\d{5}/r\d{5}/([^/]+)\.json$"), "epoch", False, _RECORD),
    (re.compile(r"^epochs/\d{5}/r\d{5}/approvals/([^/]+)\.json$"), "approval", False, _RECORD),
    (re.compile(r"^joins/([^/]+)\.json$"), "join", False, _RECORD),
    (re.compile(r"^fingerprints/([^/]+)/summary\.p2pf$"), "summary", True, _envelope("summary")),
    (re.compile(r"^fingerprints/([^/]+)/histogram\.p2pf$"), "histogram", True, _envelope("histogram")),
    (re.compile(r"^fingerprints/SEAL\.json$"), "fingerprint-seal", False, _RECORD),
    (re.compile(r"^declarations/([^/]+)\.p2pf$"), "declaration", True, _envelope("declaration")),
    (re.compile(r"^rounds/\d{5}/([^/]+)/declaration\.p2pf$"), "declaration", True, _envelope("declaration")),
    (re.compile(r"^plans/([^/]+)\.p2pf$"), "plan", True, _envelope("plan")),
    (re.compile(r"^plans/([^/]+)\.json$"), "plan-hash", False, _RECORD),
    (re.compile(r"^rounds/\d{5}/([^/]+)/[0-9a-f]{64}\.shard$"), "shard", True, _envelope("shard")),
    (re.compile(r"^rounds/\d{5}/([^/]+)/meta\.p2pf$"), "meta", True, _envelope("meta")),
    (re.compile(r"^masked/\d{5}/([^/]+)/[0-9a-f]{64}\.masked$"), "masked", True, _envelope("masked")),
    (re.compile(r"^rounds/\d{5}/([^/]+)/keys\.p2pf$"), "keys", True, _envelope("keys")),
    (re.compile(r"^rounds/\d{5}/KEYS\.json$"), "keyseal", False, _RECORD),
    (re.compile(r"^rounds/\d{5}/([^/]+)/reveal\.p2pf$"), "reveal", True, _envelope("reveal")),
    (re.compile(r"^rounds/\d{5}/_slices/\d{5}/([^/]+)\.p2pf$"), "slice", True, _envelope("shard")),
    (re.compile(r"^rounds/\d{5}/_slices/\d{5}/([^/]+)\.json$"), "slice-hash", False, _RECORD),
    (re.compile(r"^rounds/\d{5}/([^/]+)/COMMIT\.json$"), "commit", False, _RECORD),
    (re.compile(r"^rounds/\d{5}/SEAL\.json$"), "seal", False, _RECORD),
    (re.compile(r"^rounds/\d{5}/merged/([^/]+)\.json$"), "merged", False, _RECORD),
    (re.compile(r"^rounds/\d{5}/merged/([^/]+)\.reasons\.p2pf$"), "reasons", True, _envelope("reasons")),
    (re.compile(r"^rounds/\d{5}/([^/]+)/handover-[^/]+\.json$"), "handover", False, _RECORD),
    (re.compile(r"^rounds/\d{5}/([^/]+)/handover-[^/]+/[0-9a-f]{64}\.shard$"), "handover-shard", True,
     _envelope("shard")),
    (re.compile(r"^rounds/\d{5}/([^/]+)/handover-[^/]+/fingerprint\.p2pf$"), "handover-fingerprint", True,
     _envelope("summary")),  # the federated fingerprint: per-case geometry, as a summary holds
    (re.compile(r"^final/([^/]+)\.p2pf$"), "final", True, _envelope("final")),
]
FOREIGN_MAX_BYTES = _RECORD  # a key of no kind (junk, probes) is read only by `verify`, to report it


def kind_of(key: str) -> tuple[str, bool, str | None] | None:
    """(kind, is_envelope, site the key names or None) of a protocol key or of one of its
    slots; None if foreign. For join records the site is the joining site; for epoch records, the proposer or
    approver."""
    return _kind(unslot(key)[0])


def _kind(key: str) -> tuple[str, bool, str | None] | None:
    for pattern, kind, envelope, _ in KINDS:
        m = pattern.match(key)
        if m:
            return kind, envelope, (m.group(1) if m.groups() else None)
    return None


def max_size(key: str) -> int:
    """The most bytes an object at `key` may hold (read no further: storage.get)."""
    logical = unslot(key)[0]
    return next((cap for pattern, _, _, cap in KINDS if pattern.match(logical)), FOREIGN_MAX_BYTES)


def kind_name(key: str) -> str:
    """The kind of `key` for messages ("unknown" for a key of no kind)."""
    parsed = kind_of(key)
    return parsed[0] if parsed else "unknown"


def site_of(key: str, kind: str) -> str | None:
    """The site a key of `kind` names (None if the key is not of that kind)."""
    parsed = kind_of(key)
    return parsed[2] if parsed and parsed[0] == kind else None


def shard_plain_sha256(key: str) -> str:
    """A shard (masked or not) is named by the sha256 of its plaintext (which its author signs)."""
    return key.rsplit("/", 1)[1].split(".", 1)[0]


def sites_in(keys, kind: str) -> dict[str, str]:
    """site -> (logical) key for every key of `kind`, or a slot of one, among `keys`."""
    return {site: unslot(key)[0] for key in sorted(keys) if (site := site_of(key, kind)) is not None}
