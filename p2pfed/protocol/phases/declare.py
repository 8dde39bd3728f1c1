"""Declare: right after the start, each participant declares its merge weight, the
number of training cases of its fold, once, in an envelope for the participants
(`declarations/<site>.p2pf`, payload `{"cases": n}`). No site goes on (shares
statistics, plans or trains) before every participant has declared, and every merge
weighs a contribution by its site's declaration, never by a per-round claim
(docs/design.md 7.2, 7.3). Declarations are verified once and kept in the site home."""
from __future__ import annotations

from ... import crypto, layout
from ...errors import ContributionRejected, DatasetError
from ...objects import read_json
from ...schema import MAX_CASES
from ..wait import Wait

NAME = "declare"
KIND = "declaration"


def advance(t) -> str | None:
    if "declared" in t.state:
        return None
    v, key = t.view, layout.declaration(t.site)
    if _declared(v, t.site) is None:
        cases = t.trainer.cases()
        if type(cases) is not int or not 1 <= cases <= MAX_CASES:
            raise DatasetError(f"this site has {cases!r} training cases; a declaration needs 1..{MAX_CASES}")
        t.write.envelope(key, KIND, crypto.canonical_json({"cases": cases}))
        return f"declared {cases} training cases"
    missing = [s for s in v.participants if _declared(v, s) is None]
    if missing:
        raise Wait(NAME, f"waiting for the case-count declarations of {', '.join(missing)}", missing)
    declared, refused = read_all(v, t.me)
    t.save(declared=declared, refused_declarations=refused)
    return None


def _declared(view, site: str) -> bytes | None:
    """The stored declaration of `site`, in whichever slot it went to (None: not yet)."""
    found = view.resolve(layout.declaration(site), KIND, site)
    return found[1] if found else None


def read_all(view, reader) -> tuple[dict[str, int], dict[str, str]]:
    """({site: declared cases}, {site: why its declaration is refused}) over the
    participants whose declaration exists. Tampering raises IntegrityError; a
    well-signed but unusable declaration (schema.PAYLOADS["declaration"]: an integer in
    1..MAX_CASES) is refused, naming its site."""
    declared, refused = {}, {}
    for site in view.participants:
        blob = _declared(view, site)
        if blob is None:
            continue
        try:
            declared[site] = read_json(view.fed, layout.declaration(site), KIND, reader, author=site,
                                       blob=blob)[1]["cases"]
        except ContributionRejected as exc:
            refused[site] = f"{exc.message}; none of its contributions is merged"
    return declared, refused


def pending(v) -> dict | None:
    missing = [s for s in v.participants if _declared(v, s) is None]
    return {"waiting_for": missing} if missing else None
