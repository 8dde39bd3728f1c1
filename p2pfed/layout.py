"""Every storage key of the protocol is built here, and only here (docs/design.md, "Bucket tree")."""
from __future__ import annotations

import re

FEDERATION = "federation.json"
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def valid_site(name: str) -> bool:
    return bool(SITE_NAME.match(name)) and ".." not in name


def epoch_proposal(e: int, from_round: int, site: str) -> str:
    return f"epochs/{e:05d}/r{from_round:05d}/{site}.json"


def epoch_approval(e: int, from_round: int, site: str) -> str:
    return f"epochs/{e:05d}/r{from_round:05d}/approvals/{site}.json"


def epoch_of(key: str) -> tuple[str, int, int, str] | None:
    """(kind "epoch" or "approval", epoch number, first round, site) of a membership log key."""
    parsed = kind_of(key)
    if parsed is None or parsed[0] not in ("epoch", "approval"):
        return None
    parts = key.split("/")
    return parsed[0], int(parts[1]), int(parts[2][1:]), parsed[2]


def join_request(site: str) -> str:
    return f"joins/{site}.json"


def summary(site: str) -> str:
    return f"fingerprints/{site}/summary.p2pf"


def histogram(site: str) -> str:
    return f"fingerprints/{site}/histogram.p2pf"


FINGERPRINT_SEAL = "fingerprints/SEAL.json"


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


def merged(r: int, site: str) -> str:
    return f"{round_dir(r)}/merged/{site}.json"


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


def round_of(key: str) -> int | None:
    m = re.match(r"^rounds/(\d{5})/", key)
    return int(m.group(1)) if m else None


def folder(key: str) -> str:
    """The prefix a tick lists once to learn which keys near `key` exist: a round's
    folder, or the first path component (epochs, fingerprints, plans, final)."""
    r = round_of(key)
    return round_dir(r) if r is not None else key.split("/", 1)[0] if "/" in key else ""


# key pattern -> (kind, is_envelope). The group, if any, names the author site.
KINDS: list[tuple[re.Pattern, str, bool]] = [
    (re.compile(r"^federation\.json$"), "federation", False),
    (re.compile(r"^epochs/\d{5}/r\d{5}/([^/]+)\.json$"), "epoch", False),
    (re.compile(r"^epochs/\d{5}/r\d{5}/approvals/([^/]+)\.json$"), "approval", False),
    (re.compile(r"^joins/([^/]+)\.json$"), "join", False),
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
    (re.compile(r"^rounds/\d{5}/([^/]+)/handover-[^/]+\.json$"), "handover", False),
    (re.compile(r"^rounds/\d{5}/([^/]+)/handover-[^/]+/[0-9a-f]{64}\.shard$"), "handover-shard", True),
    (re.compile(r"^rounds/\d{5}/([^/]+)/handover-[^/]+/fingerprint\.p2pf$"), "handover-fingerprint", True),
    (re.compile(r"^final/([^/]+)\.p2pf$"), "final", True),
]


def kind_of(key: str) -> tuple[str, bool, str | None] | None:
    """(kind, is_envelope, site the key names or None) of a protocol key; None if foreign.
    For join records the site is the joining site; for epoch records, the proposer or approver."""
    for pattern, kind, envelope in KINDS:
        m = pattern.match(key)
        if m:
            return kind, envelope, (m.group(1) if m.groups() else None)
    return None


def site_of(key: str, kind: str) -> str | None:
    """The site a key of `kind` names (None if the key is not of that kind)."""
    parsed = kind_of(key)
    return parsed[2] if parsed and parsed[0] == kind else None


def shard_plain_sha256(key: str) -> str:
    """A shard is named by the sha256 of its plaintext (which its author signs)."""
    return key.rsplit("/", 1)[1][:-len(".shard")]


def sites_in(keys, kind: str) -> dict[str, str]:
    """site -> key for every key of `kind` among `keys`."""
    return {site: key for key in keys if (site := site_of(key, kind)) is not None}
