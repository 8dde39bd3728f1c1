"""Declare: right after the start, each participant declares its merge weight, the
number of training cases of its fold, once, in an envelope for the participants
(`declarations/<site>.p2pf`, payload `{"cases": n}`). No site goes on (shares
statistics, plans or trains) before every participant has declared, and every merge
weighs a contribution by its site's declaration, never by a per-round claim
(docs/design.md 7.2, 7.3). Declarations are verified once and kept in the site home."""
from __future__ import annotations

import json

from ... import crypto, layout
from ...errors import ContributionRejected, DatasetError
from ...objects import read_envelope
from ..contribution import MAX_CASES, valid_cases as valid
from ..wait import Wait

NAME = "declare"
KIND = "declaration"


def advance(t) -> str | None:
    if "declared" in t.state:
        return None
    v, key = t.view, layout.declaration(t.site)
    if not v.has(key):
        cases = t.trainer.cases()
        if not valid(cases):
            raise DatasetError(f"this site has {cases!r} training cases; a declaration needs 1..{MAX_CASES}")
        t.write.envelope(key, KIND, crypto.canonical_json({"cases": cases}))
        return f"declared {cases} training cases"
    missing = [s for s in v.participants if not v.has(layout.declaration(s))]
    if missing:
        raise Wait(NAME, f"waiting for the case-count declarations of {', '.join(missing)}", missing)
    declared, refused = read_all(v, t.me)
    t.save(declared=declared, refused_declarations=refused)
    return None


def read_all(view, reader) -> tuple[dict[str, int], dict[str, str]]:
    """({site: declared cases}, {site: why its declaration is refused}) over the
    participants whose declaration exists. Tampering raises IntegrityError; a
    well-signed but unusable declaration is refused, naming its site."""
    declared, refused = {}, {}
    for site in view.participants:
        key = layout.declaration(site)
        if not view.has(key):
            continue
        try:
            declared[site] = _cases(view, reader, site, key)
        except ContributionRejected as exc:
            refused[site] = exc.message
    return declared, refused


def _cases(view, reader, site: str, key: str) -> int:
    plain = read_envelope(view.fed, key, KIND, reader, author=site, blob=view.get(key))[1]
    try:
        body = json.loads(plain)
    except ValueError:
        body = None
    cases = body.get("cases") if isinstance(body, dict) else None
    if not valid(cases):
        raise ContributionRejected(f"site {site!r}: declared case count {cases!r} is not an integer "
                                   f"in 1..{MAX_CASES}; none of its contributions is merged")
    return cases


def pending(v) -> dict | None:
    missing = [s for s in v.participants if not v.has(layout.declaration(s))]
    return {"waiting_for": missing} if missing else None
