"""Every storage key of the protocol is built here, and only here (docs/design.md, "Bucket tree")."""
from __future__ import annotations

import re

FEDERATION = "federation.json"
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def valid_site(name: str) -> bool:
    return bool(SITE_NAME.match(name)) and ".." not in name


def member(site: str) -> str:
    return f"members/{site}.json"


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


def final_metrics(site: str) -> str:
    return f"final/{site}.p2pf"


def round_of(key: str) -> int | None:
    m = re.match(r"^rounds/(\d{5})/", key)
    return int(m.group(1)) if m else None
