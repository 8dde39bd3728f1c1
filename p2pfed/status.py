"""`p2pfed status`: one JSON document (stable, versioned) rendered as tables or plotted.

Without a site it shows what the storage operator could see too (membership, seals,
who committed what). With a site, it also decrypts the per-round metrics."""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path

from . import federation as fedmod
from . import layout
from .crypto import Identity, grouped
from .errors import P2PFedError, UsageError
from .federation import Federation
from .objects import read_envelope, read_json
from .protocol import View
from .protocol.contribution import weight_shares
from .protocol.phases import declare, where
from .protocol.view import Chain, head_hash
from .storage import open_storage

STATUS_FORMAT = "p2pfed-status/1"
METRICS = ("train_loss", "val_loss", "pseudo_dice")


def document(home: str | None, site: str | None, storage: str | None, endpoint: str | None) -> dict:
    if site:
        from .node import open_site

        home_, config, fed = open_site(home, site, endpoint)
        reader = home_.identity()
        local = {**home_.state(), "nnunet_results": config.nnunet_results, "chain": Chain(home_).data}
    elif storage:
        fed, reader, local = fedmod.load(open_storage(storage, endpoint)), None, {}
    else:
        raise UsageError("give --site NAME (to decrypt metrics) or --storage URL",
                         "e.g. `p2pfed status --site uka`; see `p2pfed status --help`")
    return build(fed, reader, local)


def build(fed: Federation, reader: Identity | None, local: dict | None = None, view: View | None = None) -> dict:
    """The status document, read through the same per-tick View the phases use."""
    view = view or View(fed)
    keys = view.keys("")
    doc = {
        "format": STATUS_FORMAT,
        "storage": fed.storage.url,
        "federation": {"id": fed.id, "fingerprint": fed.genesis_sha256, "founder": fed.founder, "created": fed.created,
                       "settings": asdict(fed.settings), "versions": fed.versions},
        "members": [{"site": s, "fingerprint": i.fingerprint(), "admitted_by": fed.admitted_by.get(s)}
                    for s, i in sorted(fed.members.items())],
        "pending": [{"site": s, "fingerprint": i.fingerprint()} for s, i in sorted(fed.pending.items())],
        "epoch": _epoch(fed.log.chain[-1]),
        "proposals": [{**_epoch(p.epoch), "approvers": list(p.approvers), "needed": p.needed}
                      for p in fed.log.open],
        "participants": view.participants,
        "rounds": [],
        "final": {},
        "viewer": reader.site if reader else None,
    }
    doc["plans"] = {s: body.get("plan_sha256") for s, k in sorted(layout.sites_in(keys, "plan-hash").items())
                    if (body := view.record(k, "plan-hash", s)) is not None}
    doc["plan_details"] = {s: _plan_details(_decrypt(view, layout.plan(s), "plan", s, reader), fed.settings.configuration)
                           for s in doc["plans"] if reader is not None and layout.plan(s) in keys}
    doc["declared"] = _declarations(view, reader)
    doc["rounds"] = _rounds(view, keys, reader)
    doc["secure_aggregation"] = _secure(view, reader)
    for s, key in sorted(layout.sites_in(keys, "final").items()):
        doc["final"][s] = _decrypt(view, key, "final", s, reader)
    doc["phase"] = where(view)
    doc["started_at"] = (view.start_seal() or {}).get("sealed_at")
    doc["steps"] = _steps(doc)
    doc["progress"] = _progress(doc, fed.settings, view)
    doc["chain_head"] = chain_head(doc, view, (local or {}).get("chain"))
    if local:
        doc["local"] = {k: local.get(k) for k in ("round", "results_folder", "final_dice", "finished",
                                                  "nnunet_results") if k in local}
    doc["junk"] = dict(sorted(view.junk.items()))  # objects at protocol keys that do not count
    return doc


def _secure(view: View, reader: Identity | None) -> dict:
    """Secure aggregation: the threshold, the fewest contributions a round may be sealed
    with, the tensors of the reader that no secure group merges (asym: shared by fewer
    than three sites), and with DP the epsilon spent (from the seals: public)."""
    from . import dp, secagg

    s = view.s
    if not s.secure_aggregation:
        return {"on": False}
    n = len(view.participants_of(max(view.current_round() - 1, 1))) if view.participants else s.sites
    doc = {"on": True, "threshold": secagg.threshold(n), "minimum": secagg.minimum(n, min(s.effective_quorum, n)),
           "kept_local": None}
    sealed = [r for r in range(1, view.current_round()) if view.key_seal(r) is not None and view.seal(r)]
    if reader is not None and sealed and reader.site in view.key_seal(sealed[-1])[1]["keys"]:
        doc["kept_local"] = _kept_local(view, reader, sealed[-1])
    if s.dp:
        zs = [dp.round_multiplier(s.dp_noise_multiplier, len(view.key_seal(r)[1]["keys"]),
                                  len(view.seal(r)["contributions"])) for r in sealed]
        doc["dp"] = {"epsilon": dp.epsilon(zs, s.dp_delta), "delta": s.dp_delta, "rounds": len(zs),
                     "clip": s.dp_clip, "noise_multiplier": s.dp_noise_multiplier}
    return doc


def _kept_local(view: View, reader: Identity, r: int) -> list[str]:
    from . import secagg

    if view.mode.plans_must_agree:
        return []  # FFE: every site holds every tensor of the one shared model (at least 3 sites)
    layouts = {}
    for site, sha in view.key_seal(r)[1]["keys"].items():
        key = layout.secagg_keys(r, site)
        payload = read_json(view.fed, key, "keys", reader, author=site, blob=view.find(key, sha, layout.key_seal(r)),
                            round=r)[1]
        layouts[site] = {k: tuple(shape) for k, shape in payload["layout"]}
    groups = secagg.groups(layouts, view.s.layers)
    return [f"{k} {list(shape)}" for k, shape in layouts[reader.site].items() if (k, shape) not in groups]


def chain_head(doc: dict, view: View, kept: dict | None) -> dict | None:
    """The latest sealed round, its seal's sha256 and its merge result, and a short hash
    of the three for members to compare by phone: from the chain this site kept, or (no
    site) from the storage."""
    if kept is not None:
        rounds = [int(r) for r in kept["seals"] if r != "start"]
        if not rounds:
            return None
        r = max(rounds)
        seal, result = kept["seals"][str(r)]["sha256"], kept["merges"].get(str(r))
    else:
        sealed = [e for e in doc["rounds"] if e["sealed"]]
        if not sealed:
            return None
        r = sealed[-1]["round"]
        seal, result = view.seal_sha(r), sealed[-1].get("merge_result")
    return {"round": r, "seal": seal, "result": result, "short": head_hash(r, seal, result)}


def _decrypt(view: View, key, kind, site, reader, **binding):
    if reader is None:
        return None
    found = view.resolve(key, kind, site)
    if found is None:
        return None
    try:
        return json.loads(read_envelope(view.fed, key, kind, reader, author=site, blob=found[1], **binding)[1])
    except P2PFedError as exc:
        return {"error": exc.message}


def _declarations(view: View, reader) -> dict | None:
    """A member's view: each participant's declared case count and its share of a merge's
    weight when every participant contributes (cap applied). None without a reader: the
    storage operator sees no case count."""
    if reader is None:
        return None
    try:
        declared, refused = declare.read_all(view, reader)
    except P2PFedError as exc:
        return {"error": exc.message}
    shares = weight_shares(view.s, declared) if declared else {}
    total = sum(shares.values())
    return {**{s: {"cases": declared[s], "share": float(shares[s] / total)} for s in declared},
            **{s: {"error": why} for s, why in refused.items()}}


def _plan_details(plan: dict | None, configuration: str) -> dict | None:
    """What differs between sites' networks (asym): the federation's configuration only."""
    conf = (plan or {}).get("configurations", {}).get(configuration)
    if not conf:
        return None
    arch = conf.get("architecture", {}).get("arch_kwargs", {})
    return {"spacing": conf.get("spacing"), "patch_size": conf.get("patch_size"),
            "batch_size": conf.get("batch_size"), "n_stages": arch.get("n_stages"),
            "features_per_stage": arch.get("features_per_stage"),
            "network": conf.get("architecture", {}).get("network_class_name", "").rsplit(".", 1)[-1]}


def _rounds(view: View, keys: set[str], reader) -> list[dict]:
    rounds = []
    for r in sorted({layout.round_of(k) for k in keys} - {None}):
        seal = view.seal(r)
        entry = {"round": r, "sealed": seal is not None,
                 "seal": {k: seal[k] for k in ("contributions", "reason", "opened_at", "sealed_at", "author")} if seal else None,
                 "sites": {}}
        merged = view.merge_records(r)
        for s in view.participants or sorted(view.fed.members):
            committed = s in view.commits(r)  # verified: junk at a commit key is not a commit
            counted = bool(seal and s in seal["contributions"])
            meta = _decrypt(view, layout.meta(r, s), "meta", s, reader, round=r) \
                if committed and view.has(layout.meta(r, s)) else None
            entry["sites"][s] = {
                "committed": committed, "counted": counted,
                "missed": bool(seal) and not counted and r > 0,
                "cases": (meta or {}).get("cases"),
                "metrics": {m: (meta or {}).get("metrics", {}).get(m) for m in METRICS} if meta else None,
                "merged_result": merged[s]["result"] if s in merged else None,
                "merged_model": merged[s]["per_site"].get(s) if s in merged else None,
            }
        # agreed only once every participant has published the same result
        expected = list(view.participants) if seal else []
        results = {m["result"] for m in merged.values()}
        entry["merge_published"] = [len([s for s in expected if s in merged]), len(expected)]
        entry["merge_agreed"] = False if len(results) > 1 else \
            True if expected and all(s in merged for s in expected) else None
        entry["merge_result"] = results.pop() if entry["merge_agreed"] else None
        entry["excluded"] = _excluded(view, r, merged, reader)
        rounds.append(entry)
    return rounds


def _excluded(view: View, r: int, merged: dict[str, dict], reader) -> dict[str, str | None]:
    """site -> why the merge left it out; the reasons are in envelopes for the participants
    (None where this reader cannot decrypt them)."""
    excluded = {}
    for author, record in sorted(merged.items()):
        reasons = _decrypt(view, layout.merge_reasons(r, author), "reasons", author, reader, round=r) \
            if record.get("reasons") else None
        for site in record.get("excluded") or []:
            why = reasons.get(site) if isinstance(reasons, dict) and "error" not in reasons else None
            excluded[site] = excluded.get(site) or why
    return excluded


def _steps(doc: dict) -> dict[str, str]:
    """What each participant is doing now, from the phase and what it has published."""
    phase, final = doc["phase"], doc["final"]
    name, waiting = phase["name"], set(phase["waiting_for"])
    steps = {}
    for p in doc["participants"]:
        pending = [e["round"] for e in doc["rounds"] if not e["sealed"] and e["sites"].get(p, {}).get("committed")]
        if p in final:
            steps[p] = "finished"
        elif pending:  # asym sites go ahead of the federation's phase
            steps[p] = f"round {max(pending)} committed; waiting for the seal"
        elif name == "fingerprint":
            steps[p] = f"computing its {phase['step']}" if p in waiting else "waiting for the others' " + phase["step"]
        elif name == "plan":
            steps[p] = "planning and preprocessing" if p in waiting else "waiting for the others' plans"
        elif name == "initial model":
            steps[p] = "building the initial model" if p in waiting else "waiting for the initial model"
        elif name == "round":
            steps[p] = f"training round {phase['round']}"
        else:
            steps[p] = "final merge and validation"
    return steps


def _progress(doc: dict, settings, view: View) -> dict:
    """Rounds done out of the total, the measured time per round and the estimated end."""
    seals = [e["seal"] for e in doc["rounds"] if e["sealed"] and e["round"] > 0]
    took = [s["sealed_at"] - s["opened_at"] for s in seals if s.get("sealed_at") and s.get("opened_at")]
    per_round = statistics.median(took[-5:]) if took else None
    remaining = settings.rounds - len(seals)
    eta = None
    if per_round is not None and remaining > 0:
        eta = max(int(time.time()), int(max(s["sealed_at"] for s in seals) + remaining * per_round))
    # the open round: the federation's, or (asym) the first one a site went ahead to
    phase, unsealed = doc["phase"], [e["round"] for e in doc["rounds"] if not e["sealed"] and e["round"] > 0]
    r = phase.get("round") if phase["name"] == "round" else min(unsealed, default=None)
    # when the open round opened is the protocol's rule (the view's), not re-derived here
    deadline = view.opened_at(r) + settings.deadline_s if r and view.participants else None
    return {"rounds_done": len(seals), "rounds_total": settings.rounds, "round_seconds": per_round,
            "eta": eta, "open_round": r, "round_deadline": deadline}


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def duration(seconds: float) -> str:
    """21600 -> '6h', 5400 -> '90m', 45 -> '45s': the largest unit that divides evenly
    (the federation stores seconds; this gives back the unit `--deadline` was given in)."""
    seconds = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _about(seconds: float) -> str:
    """A rough span for an ETA: '3h 20m', '12m', '40s'."""
    seconds = int(seconds)
    if seconds >= 86400:
        return f"{seconds // 86400}d {seconds % 86400 // 3600}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60}m"
    return f"{seconds // 60}m" if seconds >= 60 else f"{seconds}s"


def local_time(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(ts))


# --------------------------------------------------------------------------- rendering
def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def render(doc: dict, console) -> None:
    from rich.table import Table

    fed, st = doc["federation"], doc["federation"]["settings"]
    console.print(f"[bold]Federation[/] {fed['id']} on {doc['storage']}", soft_wrap=True)
    console.print(f"federation fingerprint {grouped(fed['fingerprint'])} (compare it with the founder's)")
    console.print(f"mode {st['mode']}, {st['configuration']} fold {st['fold']}, {plural(st['rounds'], 'round')} x "
                  f"{plural(st['epochs_per_round'], 'epoch')} x {plural(st['iterations_per_epoch'], 'iteration')}"
                  + (f" from learning rate {st['learning_rate']:g}" if st.get("learning_rate") else "") + "; "
                  f"quorum {st['quorum'] or st['sites']}/{st['sites']}, deadline {duration(st['deadline_s'])}; "
                  f"weighting {st['weighting']}"
                  + (f" (max share {st['max_weight_share']:g})" if st.get("max_weight_share") else "")
                  + f", layers {st['layers']}"
                  + {"reset": ", SGD momentum reset at every merge",
                     "merged": ", SGD momentum merged with the weights"}.get(st.get("optimizer_state"), ""))
    phase = doc["phase"]
    where = phase["name"] + (f" {phase['round']}" if "round" in phase else "")
    console.print(f"[bold]Phase:[/] {where}" + (f"; waiting for {', '.join(phase['waiting_for'])}"
                                                 if phase["waiting_for"] else ""))
    console.print(_epochs_line(doc), markup=False, soft_wrap=True)
    _render_progress(doc, console)
    sa = doc.get("secure_aggregation") or {}
    if sa.get("on"):
        line = (f"[bold]Secure aggregation:[/] on (shares: {sa['threshold']} reconstruct; a round needs "
                f"{sa['minimum']} contributions)")
        if sa.get("kept_local"):
            line += f"; {plural(len(sa['kept_local']), 'tensor')} shared by fewer than 3 sites stay local"
        if sa.get("dp"):
            line += f"; DP epsilon {sa['dp']['epsilon']:.3g} spent (delta {sa['dp']['delta']:g}, {plural(sa['dp']['rounds'], 'round')})"
        console.print(line, soft_wrap=True)
    head = doc.get("chain_head")
    if head:
        console.print(f"[bold]Chain head:[/] {head['short']} (round {head['round']}; compare it with the other "
                      f"members by phone)")
    for key, why in (doc.get("junk") or {}).items():
        console.print(f"ignored, not an object of this federation: {key}: {why}", markup=False, soft_wrap=True)
    for part in (_members_table, _plans_table, _rounds_table, _final_table):
        table = part(doc, Table)
        if table is not None:
            console.print(table)
    for e in doc["rounds"]:
        for site, why in sorted((e.get("excluded") or {}).items()):
            if why:
                console.print(f"round {e['round']}: excluded {why}", markup=False, soft_wrap=True)


def _members_table(doc: dict, Table):
    members = Table(title="Members")
    declared = doc.get("declared")
    for col in ("site", "fingerprint", "admitted by", "plan") + (("declared cases (share)",) if declared else ()):
        members.add_column(col)
    for m in doc["members"]:
        members.add_row(m["site"], grouped(m["fingerprint"]), m["admitted_by"] or "-",
                        (doc["plans"].get(m["site"]) or "-")[:12], *_declared_cell(declared, m["site"]))
    for p in doc["pending"]:
        members.add_row(p["site"], grouped(p["fingerprint"]), "[yellow]pending[/]", "-", *_declared_cell(declared, ""))
    return members


def _epoch(e) -> dict:
    """An epoch of the membership log, for the status document."""
    return {"number": e.number, "sha256": e.sha256, "change": e.change, "from_round": e.from_round,
            "members": sorted(e.members)}


def _epochs_line(doc: dict) -> str:
    """The membership epoch in force and what is waiting for approvals, in one line."""
    e = doc["epoch"]
    line = f"membership epoch {e['number']} ({e['sha256'][:12]}), {plural(len(e['members']), 'member')}"
    for p in doc["proposals"]:
        c = p["change"] or {}
        line += (f"; proposed: {c.get('op')} {c.get('site')!r} from round {p['from_round']}, "
                 f"{len(p['approvers'])} of {p['needed']} approvals ({', '.join(p['approvers'])})")
    return line


def _declared_cell(declared: dict | None, site: str) -> tuple[str, ...]:
    if not declared:
        return ()
    d = declared if isinstance(declared.get("error"), str) else declared.get(site)  # str: none readable
    if not d:
        return ("-",)
    return (f"[red]{d['error']}[/]",) if "error" in d else (f"{d['cases']} ({d['share']:.1%})",)


def _plans_table(doc: dict, Table):
    st = doc["federation"]["settings"]
    if doc.get("plan_details"):
        plans = Table(title=f"Plans ({st['configuration']})")
        for col in ("site", "network", "stages", "patch size", "spacing", "batch"):
            plans.add_column(col)
        for site, d in sorted(doc["plan_details"].items()):
            if d:
                plans.add_row(site, d["network"], _fmt(d["n_stages"]), "x".join(map(str, d["patch_size"] or [])),
                              "x".join(f"{v:.3g}" for v in d["spacing"] or []), _fmt(d["batch_size"]))
        return plans


def _rounds_table(doc: dict, Table):
    if doc["rounds"]:
        sites = doc["participants"] or [m["site"] for m in doc["members"]]
        # public status cannot decrypt metrics: its cells say who committed, and so does the title
        table = Table(title="Rounds (train loss / val loss / pseudo-Dice)" if doc["viewer"] else
                      "Rounds (who committed; metrics need --site)")
        table.add_column("round")
        for s in sites:
            table.add_column(s)
        table.add_column("merge")
        for e in doc["rounds"]:
            cells = []
            for s in sites:
                c = e["sites"].get(s, {})
                if e["round"] == 0:
                    cells.append("initial model" if c.get("counted") else "")
                elif c.get("missed"):
                    cells.append("[red]missed[/]")
                elif not c.get("committed"):
                    cells.append("…")
                elif c.get("metrics"):
                    m = c["metrics"]
                    cells.append(" / ".join(_fmt(m[k]) for k in METRICS))
                else:
                    cells.append("committed")
            done, total = e.get("merge_published") or (0, 0)
            agreed = {True: "agreed", False: "[red]MISMATCH[/]"}.get(e["merge_agreed"],
                                                                     f"{done}/{total} published" if total else "-")
            if e.get("excluded"):
                agreed += f"; [red]excluded {', '.join(sorted(e['excluded']))}[/]"
            table.add_row(str(e["round"]) + ("" if e["sealed"] else " (open)"), *cells, agreed)
        return table


def _final_table(doc: dict, Table):
    if doc["final"]:
        final = Table(title="Final models (local validation Dice)")
        final.add_column("site")
        final.add_column("model")
        final.add_column("Dice")
        for s, f in sorted(doc["final"].items()):
            dice = (f or {}).get("validation_dice") or {}
            final.add_row(s, ((f or {}).get("model") or "-")[:16], _fmt(dice.get("foreground")) if dice else "-")
        return final


def _render_progress(doc: dict, console) -> None:
    """Steps per site, rounds done with an ETA, the open round's deadline, the results folder."""
    prog, st = doc.get("progress") or {}, doc["federation"]["settings"]
    for site, step in sorted((doc.get("steps") or {}).items()):
        console.print(f"  {site}: {step}", markup=False)
    if prog and doc["participants"]:
        line = f"[bold]Rounds:[/] {prog['rounds_done']}/{plural(prog['rounds_total'], 'round')} done"
        if prog.get("round_seconds") is not None:
            line += f", about {_about(prog['round_seconds'])} per round"
        if prog.get("eta"):
            line += f"; estimated end {local_time(prog['eta'])}"
        console.print(line)
    if prog.get("round_deadline"):
        console.print(f"[bold]Deadline[/] of round {prog['open_round']} ({duration(st['deadline_s'])} after it "
                      f"opened): {local_time(prog['round_deadline'])}; then {st['quorum'] or st['sites']} "
                      f"contribution(s) may seal it")
    local = doc.get("local") or {}
    if local.get("results_folder"):
        console.print(f"[bold]Results folder:[/] {local['results_folder']}", soft_wrap=True)
    elif local.get("nnunet_results"):
        console.print(f"[bold]Results folder:[/] not yet; the final model will be written under "
                      f"{local['nnunet_results']}", soft_wrap=True)


def results(doc: dict) -> list[dict]:
    """Per site: cases, last-round metrics, final model and its local validation Dice."""
    rows = []
    for s in doc["participants"]:
        last = next((e["sites"][s] for e in reversed(doc["rounds"]) if e["sites"].get(s, {}).get("metrics")), {})
        final = doc["final"].get(s) or {}
        dice = final.get("validation_dice") or {}
        rows.append({"site": s, "cases": last.get("cases"), **(last.get("metrics") or {}),
                     "validation_dice": dice.get("foreground"), "model": final.get("model")})
    return rows


def render_results(doc: dict, console) -> None:
    from rich.table import Table

    table = Table(title="Per-site results")
    for col in ("site", "cases", "train loss", "val loss", "pseudo-Dice", "final validation Dice", "final model"):
        table.add_column(col)
    for r in results(doc):
        table.add_row(r["site"], _fmt(r["cases"]), _fmt(r.get("train_loss")), _fmt(r.get("val_loss")),
                      _fmt(r.get("pseudo_dice")), _fmt(r["validation_dice"]), (r["model"] or "-")[:16])
    console.print(table)


def plot(doc: dict, path: Path) -> Path | None:
    """Per-site curves of train loss, validation loss and pseudo-Dice over rounds; None
    (and no file) when there is no metric to draw yet, or none this reader can decrypt."""
    sites = doc["participants"] or [m["site"] for m in doc["members"]]
    curves = {metric: {s: [(e["round"], e["sites"][s]["metrics"][metric]) for e in doc["rounds"]
                           if e["round"] > 0 and (e["sites"].get(s) or {}).get("metrics")
                           and e["sites"][s]["metrics"].get(metric) is not None] for s in sites}
              for metric in METRICS}
    if not any(pts for by_site in curves.values() for pts in by_site.values()):
        return None
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 3.6))
    for ax, metric in zip(axes, METRICS):
        for s, pts in curves[metric].items():
            if pts:
                ax.plot(*zip(*pts), marker="o", label=s)
        ax.set_title(metric.replace("_", " "))
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
            break
    fig.suptitle(f"federation {doc['federation']['id'][:8]}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
