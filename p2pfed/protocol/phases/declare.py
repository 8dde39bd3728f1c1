"""Declare: right after the start, each participant declares its merge weight, the
number of training cases of its fold, once, in an envelope for the participants
(`declarations/<site>.p2pf`, payload `{"cases": n}`). No site goes on (shares
statistics, plans or trains) before every participant has declared, and every merge
weighs a contribution by its site's declaration, never by a per-round claim
(docs/design.md 7.2, 7.3). Declarations are verified once and kept in the site home.

A site admitted after the start cannot open the start's declarations (they are
encrypted to the start's participants). So in the first round f of a site admitted
later, every participant of round f declares again in that round's folder
(`rounds/<f>/<site>/declaration.p2pf`, for round f's members): old participants the
count they declared before (a different one is refused), newcomers theirs. Old sites
wait for these only once round f is open; the newcomer before it does anything."""
from __future__ import annotations

from ... import crypto, layout
from ...errors import ContributionRejected, DatasetError
from ...objects import read_json
from ...schema import MAX_CASES
from ..wait import Wait

NAME = "declare"
KIND = "declaration"


def advance(t) -> str | None:
    if t.view.joins_at(t.site) is not None and "declared" not in t.state:
        t.save(declared={}, refused_declarations={})  # admitted later: it declares in its first round
    if "declared" in t.state:
        return _again(t)
    v, key = t.view, layout.declaration(t.site)
    if not t.state.get("declared_own"):  # verified once, then kept: an idle tick reads no declaration
        if _declared(v, t.site) is None:
            cases = t.trainer.cases()
            if type(cases) is not int or not 1 <= cases <= MAX_CASES:
                raise DatasetError(f"this site has {cases!r} training cases; a declaration needs 1..{MAX_CASES}")
            t.write.envelope(key, KIND, crypto.canonical_json({"cases": cases}))
            return f"declared {cases} training cases"
        t.save(declared_own=True)
    # the listing says who is missing; the objects are read (and junk found) once all are listed
    missing = [s for s in v.participants if not v.has(layout.declaration(s))] or \
        [s for s in v.participants if _declared(v, s) is None]
    if missing:
        raise Wait(NAME, f"waiting for the case-count declarations of {', '.join(missing)}", missing)
    declared, refused = read_all(v, t.me)
    t.save(declared=declared, refused_declarations=refused)
    return None


def _declared(view, site: str, r: int | None = None) -> bytes | None:
    """The stored declaration of `site` (of round r), in whichever slot it went to (None: not yet)."""
    found = view.resolve(layout.declaration(site, r), KIND, site)
    return found[1] if found else None


def _admission_rounds(v, site: str) -> list[int]:
    """The rounds in which sites join after the start and `site` takes part."""
    joined = {v.joins_at(s) for e in v.fed.log.chain for s in e.members}
    return sorted(f for f in joined - {None} if site in v.participants_of(f))


def _again(t) -> str | None:
    """Declare again in every round a site joins (see the module's docstring). A newcomer
    waits for every round-f declaration; the others learn what is there and go on: a
    commit is written after its site's declaration, so a seal listing it comes later."""
    v, done = t.view, t.state.get("redeclared", [])
    for f in _admission_rounds(v, t.site):
        if f in done:
            continue
        if _declared(v, t.site, f) is None:
            cases = t.state["declared"].get(t.site) or t.trainer.cases()
            t.write.envelope(layout.declaration(t.site, f), KIND, crypto.canonical_json({"cases": cases}), round=f)
            return f"declared {cases} training cases for round {f}"
        missing = [s for s in v.participants_of(f) if _declared(v, s, f) is None]
        _learn(t, f, complete=not missing)
        if missing and v.joins_at(t.site) == f:
            raise Wait(NAME, f"waiting for the case-count declarations of {', '.join(missing)} "
                             f"(round {f})", missing, rnd=f)
    return None


def _learn(t, f: int, complete: bool) -> None:
    """Keep the round-f declarations there are: a site's count must not change from what
    it declared before (then it is refused)."""
    declared, refused = dict(t.state["declared"]), dict(t.state.get("refused_declarations", {}))
    again, why = read_all(t.view, t.me, f)
    for site, cases in again.items():
        if site in declared and declared[site] != cases:
            refused[site] = (f"site {site!r}: declared {cases} cases in round {f}, {declared[site]} before; "
                             "none of its contributions is merged")
        declared.setdefault(site, cases)
    changes = {"declared": declared, "refused_declarations": {**why, **refused}}
    if complete:
        changes["redeclared"] = [*t.state.get("redeclared", []), f]
    if any(t.state.get(k) != val for k, val in changes.items()):
        t.save(**changes)


def read_all(view, reader, r: int | None = None) -> tuple[dict[str, int], dict[str, str]]:
    """({site: declared cases}, {site: why its declaration is refused}) over the
    participants whose declaration exists. Tampering raises IntegrityError; a
    well-signed but unusable declaration (schema.PAYLOADS["declaration"]: an integer in
    1..MAX_CASES) is refused, naming its site."""
    declared, refused = {}, {}
    for site in (view.participants if r is None else view.participants_of(r)):
        blob = _declared(view, site, r)
        if blob is None:
            continue
        binding = {} if r is None else {"round": r}
        try:
            declared[site] = read_json(view.fed, layout.declaration(site, r), KIND, reader, author=site,
                                       blob=blob, **binding)[1]["cases"]
        except ContributionRejected as exc:
            refused[site] = f"{exc.message}; none of its contributions is merged"
    return declared, refused


def pending(v) -> dict | None:
    missing = [s for s in v.participants if _declared(v, s) is None]
    return {"waiting_for": missing} if missing else None
