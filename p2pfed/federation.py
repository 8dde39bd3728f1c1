"""The federation record (genesis), membership (join requests, admissions) and the
verified view of both that every command starts from (docs/design.md, "Membership")."""
from __future__ import annotations

import hmac
import json
import re
import secrets
import time
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata
from pathlib import Path

from . import epochs, layout, schema
from .crypto import Identity, PublicIdentity, open_record, sha256_hex, sign_record
from .errors import IntegrityError, SetupError, UsageError
from .site import atomic_write
from .storage import Storage

FORMAT = 1
MODES = ("ffe", "asym")
WEIGHTINGS = ("cases", "uniform")
LAYERS = ("subset", "intersection")
OPTIMIZER_STATES = ("local", "reset", "merged")


def parse_duration(text: str) -> int:
    """'90s', '30m', '2h', '1d' or plain seconds -> seconds."""
    m = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", str(text))
    if not m:
        raise UsageError(f"cannot read duration {text!r}", "use e.g. 90s, 30m, 2h or 1d")
    return int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def version_of(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


@dataclass(frozen=True)
class Settings:
    """Federation-wide settings, fixed at init and signed into federation.json."""

    mode: str = "ffe"
    configuration: str = "3d_fullres"
    fold: int = 0
    rounds: int = 1000
    epochs_per_round: int = 1
    iterations_per_epoch: int = 250
    val_iterations: int = 50
    sites: int = 2
    quorum: int | None = None
    deadline_s: int = 86400
    weighting: str = "cases"
    layers: str = "subset"
    trainer: str = "nnUNetTrainer"
    planner: str = "ExperimentPlanner"
    plans_identifier: str = "nnUNetPlans"
    gpu_memory_target: float = 8.0
    final_validation: bool = True
    max_update_norm: float | None = None
    max_weight_share: float | None = None  # cap on one contributor's share of a merge's weight
    admission_quorum: int | None = None  # approvals a membership change needs; None: a majority
    # secure aggregation (docs/design.md 7.8): members see only the sum; `p2pfed init` turns it
    # on by default for three sites or more
    secure_aggregation: bool = False
    dp_clip: float | None = None  # distributed DP: the L2 bound of each site's update
    dp_noise_multiplier: float | None = None  # the aggregate's noise std over dp_clip
    dp_delta: float = 1e-5
    sharded_from: int = 8  # secure rounds of this many key-sealed sites or more are sharded (7.9)
    # each site's SGD momentum at a merge (docs/design.md 7.4): kept from its own last round
    # ("local", the reference FednnU-Net behaviour), started afresh ("reset"), or merged with
    # the weights, weighted like them ("merged"; FFE only: it needs one network)
    optimizer_state: str = "local"
    # every site's initial learning rate (the PolyLR schedule starts there); None: the trainer
    # class's own (nnUNetTrainer: 0.01). An FFE merge averages the sites' updates, like one
    # batch n_sites times larger: docs/design.md 7.4 on why a larger one can pay
    learning_rate: float | None = None

    def __post_init__(self):
        checks = [
            (self.mode in MODES, f"--mode must be one of {', '.join(MODES)}"),
            (self.weighting in WEIGHTINGS, f"--weighting must be one of {', '.join(WEIGHTINGS)}"),
            (self.layers in LAYERS, f"--layers must be one of {', '.join(LAYERS)}"),
            (self.rounds >= 1 and self.epochs_per_round >= 1, "--rounds and --epochs-per-round must be >= 1"),
            (self.iterations_per_epoch >= 1 and self.val_iterations >= 1,
             "--iterations-per-epoch and --val-iterations must be >= 1"),
            (self.sites >= 1, "--sites must be >= 1"),
            (self.quorum is None or 1 <= self.quorum <= self.sites, "--quorum must be between 1 and --sites"),
            (self.deadline_s >= 0, "--deadline must be >= 0"),
            (self.fold >= 0 or self.fold == -1, "--fold must be >= 0"),
            (self.gpu_memory_target > 0, "--gpu-memory-target must be > 0"),
            (self.max_update_norm is None or self.max_update_norm > 0, "--max-update-norm must be > 0"),
            (self.admission_quorum is None or self.admission_quorum >= 1, "--admission-quorum must be >= 1"),
            # asym sites train from different merged models: no common base to measure against
            (self.max_update_norm is None or self.mode == "ffe", "--max-update-norm needs --mode ffe"),
            (self.max_weight_share is None or 0 < self.max_weight_share <= 1, "--max-weight-share must be in (0, 1]"),
            ((self.dp_clip is None) == (self.dp_noise_multiplier is None),
             "--dp-clip and --dp-noise-multiplier go together"),
            (self.dp_clip is None or (self.dp_clip > 0 and self.dp_noise_multiplier > 0),
             "--dp-clip and --dp-noise-multiplier must be > 0"),
            (self.dp_clip is None or self.secure_aggregation, "differential privacy needs --secure-aggregation"),
            # each site's sensitivity is its share of the sum: equal shares keep it dp_clip / n
            (self.dp_clip is None or self.weighting == "uniform", "differential privacy needs --weighting uniform"),
            (self.dp_clip is None or self.mode == "ffe", "differential privacy needs --mode ffe (a common base)"),
            (0 < self.dp_delta < 1, "--dp-delta must be in (0, 1)"),
            (self.sharded_from >= 1, "--sharded-from must be >= 1"),
            (self.learning_rate is None or 0 < self.learning_rate <= 1, "--learning-rate must be in (0, 1]"),
            (self.optimizer_state in OPTIMIZER_STATES, f"--optimizer-state must be one of {', '.join(OPTIMIZER_STATES)}"),
            (self.optimizer_state != "merged" or self.mode == "ffe",
             "--optimizer-state merged needs --mode ffe (one network, whose momentum every site holds)"),
            # DP bounds one update vector; the momentum would be a second, unbounded one
            (self.optimizer_state != "merged" or self.dp_clip is None,
             "--optimizer-state merged cannot be combined with differential privacy"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)

    @property
    def effective_quorum(self) -> int:
        return self.quorum or self.sites

    @property
    def dp(self) -> bool:
        return self.dp_clip is not None

    @property
    def total_epochs(self) -> int:
        return self.rounds * self.epochs_per_round

    @classmethod
    def from_json(cls, obj: dict) -> "Settings":
        names = {f.name for f in fields(cls)}
        unknown = set(obj) - names
        if unknown:
            raise IntegrityError(f"federation.json has unknown settings {sorted(unknown)}",
                                 "upgrade p2pfed on this site")
        schema.check(cls.schema(), obj, f"{layout.FEDERATION}: settings")  # before __post_init__ compares them
        return cls(**obj)

    @classmethod
    def schema(cls) -> schema.Obj:
        """Each setting's JSON type, from the field annotations ("int | None" -> int or null)."""
        types = {"int": schema.Int(), "float": schema.Num(), "str": schema.Str(max_len=256), "bool": schema.Bool()}
        out = {}
        for f in fields(cls):
            base, _, none = str(f.type).partition(" | ")
            out[f.name] = schema.Opt(types[base]) if none == "None" else types[base]
        return schema.Obj({}, out)


@dataclass
class Federation:
    """A verified view of federation.json and the member list."""

    storage: Storage
    id: str
    genesis_sha256: str
    settings: Settings
    founder: str
    versions: dict
    created: int
    schema: dict
    members: dict[str, PublicIdentity] = field(default_factory=dict)  # of the head epoch
    admitted_by: dict[str, str] = field(default_factory=dict)
    pending: dict[str, PublicIdentity] = field(default_factory=dict)
    log: epochs.Log | None = None  # the verified membership chain

    def expect(self, kind: str, **more) -> dict:
        return {"federation": self.id, "kind": kind, **more}

    def member_keys(self) -> dict[str, PublicIdentity]:
        return dict(self.members)

    def epoch_at(self, r: int) -> epochs.Epoch:
        """The epoch in force at round r: the last one of the chain that applies by then."""
        return [e for e in self.log.chain if e.from_round <= r][-1]

    def members_at(self, r: int) -> dict[str, PublicIdentity]:
        return self.epoch_at(r).members

    def authors(self, key: str) -> dict[str, PublicIdentity]:
        """Whose keys sign the object at `key`: a round's objects, the members of the epoch
        in force at that round (a removed site or a rotated key signs nothing later); the
        final metrics, those of the last round; the rest (fingerprints, plans, start seal),
        the members before the start (epochs applying from round 0)."""
        r = layout.round_of(key)
        if r is None and layout.kind_of(key) and layout.kind_of(key)[0] == "final":
            r = self.settings.rounds
        return self.members_at(r if r is not None else 0)


# --------------------------------------------------------------------------- creation
def create(storage: Storage, founder: Identity, settings: Settings, schema: dict) -> tuple[str, str]:
    """Write federation.json and the founder's member record. Returns (id, genesis sha256)."""
    fed_id, genesis = genesis_record(founder, settings, schema)
    publish(storage, fed_id, genesis, founder)
    return fed_id, sha256_hex(genesis)


def genesis_record(founder: Identity, settings: Settings, schema: dict) -> tuple[str, bytes]:
    """The signed federation.json, not yet written: (federation id, its bytes).

    `schema` is the founder's dataset.json labels, channel names and file ending: every
    joining site is checked against it before it shares anything."""
    fed_id = secrets.token_hex(16)
    body = {"kind": "federation", "format": FORMAT, "federation": fed_id, "created": int(time.time()),
            "founder": founder.public().to_json(), "settings": asdict(settings), "dataset_schema": schema,
            "versions": {"p2pfed": version_of("p2pfed"), "nnunetv2": version_of("nnunetv2")}}
    return fed_id, sign_record(body, founder)


def publish(storage: Storage, fed_id: str, genesis: bytes, founder: Identity) -> None:
    """Write federation.json create-only: it is epoch 0 of the membership log (the founder)."""
    try:
        storage.put_new(layout.FEDERATION, genesis)
    except FileExistsError:
        raise SetupError(f"a federation already exists at {storage.url}",
                         "use `p2pfed join` to join it, or pick another storage location") from None


def request_join(storage: Storage, fed: Federation, joiner: Identity) -> None:
    site = joiner.site
    if site in fed.members:
        raise SetupError(f"site {site!r} is already a member of this federation",
                         "pick another --site name, or use the existing site's home")
    body = {"kind": "join", "federation": fed.id, "name": layout.join_request(site), "site": site,
            "identity": joiner.public().to_json(), "author": site, "created": int(time.time())}
    try:
        storage.put_new(layout.join_request(site), sign_record(body, joiner))
    except FileExistsError:
        raise SetupError(f"another join request for site {site!r} is already waiting",
                         "pick another --site name") from None


@dataclass(frozen=True)
class Outcome:
    """Where a proposed membership change stands after this member's approval."""

    epoch: int
    change: dict
    approvers: tuple[str, ...]
    needed: int
    waiting_on: tuple[str, ...]  # members of the previous epoch who have not approved
    fingerprint: str | None = None  # of the site's keys in the new epoch (admit, rotate)
    from_round: int = 0  # the first round the epoch applies to
    too_late: str | None = None  # a proposal of the same change that can no longer be approved

    @property
    def in_force(self) -> bool:
        return len(self.approvers) >= self.needed

    @property
    def missing(self) -> int:
        return max(0, self.needed - len(self.approvers))


def admit(fed: Federation, name: str, by: Identity, fingerprint: str,
          open_round: int | None = None) -> Outcome | None:
    """Propose or approve the admission of a pending site (or a member's rotated keys);
    None if it is a member already. `open_round`: None before the start."""
    _require_member(fed, by, f"p2pfed admit {name}")
    rotation = [p for p in fed.log.open if p.epoch.change == {"op": epochs.ROTATE, "site": name}]
    if name in fed.members and rotation:  # approving a member's new keys is admitting them
        who = rotation[0].epoch.members[name]
        _check_fingerprint(fingerprint, who, name)
        return approve(fed, rotation[0].epoch.change, by, rotation[0].epoch.members,
                       rotation[0].epoch.from_round, open_round)
    if name in fed.members:
        return None
    change = {"op": epochs.ADMIT, "site": name}
    proposed = [p for p in fed.log.open if p.epoch.change == change]
    if proposed:
        who = proposed[0].epoch.members[name]
    elif name not in fed.pending:
        raise UsageError(f"no pending join request from {name!r}",
                         "the site must run `p2pfed join` first; `p2pfed status` lists pending joins")
    else:
        who = fed.pending[name]
    first = next_round(open_round)  # a running federation: it takes part from the round after next
    if first > fed.settings.rounds:
        raise UsageError(f"the federation's last round is {fed.settings.rounds}; {name!r} would take part "
                         f"from round {first}", "too late to admit; start a new federation with it")
    _check_fingerprint(fingerprint, who, name)
    return approve(fed, change, by, epochs.changed(fed.log.head, change, who), first, open_round)


def remove(fed: Federation, name: str, by: Identity, open_round: int | None) -> Outcome | None:
    """Propose or approve removing member `name`; None if it is no member (nothing to do)."""
    _require_member(fed, by, f"p2pfed remove {name}")
    if name not in fed.members:
        return None
    change = {"op": epochs.REMOVE, "site": name}
    return approve(fed, change, by, epochs.changed(fed.log.head, change), next_round(open_round), open_round)


def rotate(fed: Federation, by: Identity, new: Identity, open_round: int | None) -> Outcome:
    """Propose new keys for this site (signed with its current ones), and approve them."""
    _require_member(fed, by, f"p2pfed rotate-keys --site {by.site}")
    change = {"op": epochs.ROTATE, "site": by.site}
    return approve(fed, change, by, epochs.changed(fed.log.head, change, new.public()),
                   next_round(open_round), open_round)


def next_round(open_round: int | None) -> int:
    """The first round a change proposed now applies to: before the start, at once; after
    it, the round after next, so that the quorum is complete a whole round before it applies
    and no site contributes to that round with the old member set."""
    return 0 if open_round is None else open_round + 2


def _check_fingerprint(fingerprint: str, who: PublicIdentity, name: str) -> None:
    # the fingerprint, compared out of band, is what tells the joiner from an impostor
    if not same_fingerprint(fingerprint or "", who.fingerprint()):
        # never print the expected value: it is what an impostor would want pasted back
        raise IntegrityError(f"fingerprint mismatch for {name!r}: the keys proposed are other keys",
                             "do not approve; ask the site for its fingerprint again out of band")


def approve(fed: Federation, change: dict, by: Identity, members: dict[str, PublicIdentity],
            from_round: int = 0, open_round: int | None = None) -> Outcome:
    """Approve the open proposal of the next epoch that makes exactly this change, or
    propose it. One member has one approval per epoch: it never backs two proposals.
    `open_round`: the first unsealed round (None before the start)."""
    head, e = fed.log.head, fed.log.head.number + 1
    live = [p for p in fed.log.open if open_round is None or p.epoch.from_round > open_round + 1]
    same = [p for p in live if p.epoch.change == change and p.epoch.members == members]
    from_round = same[0].epoch.from_round if same else from_round
    if same:
        sha, approvers = same[0].sha256, same[0].approvers
    else:
        busy = [p for p in live if by.site in p.approvers] or live
        if busy:
            p = busy[0]
            what = f"{p.epoch.change['op']} {p.epoch.change['site']!r} by {p.epoch.proposer}"
            raise SetupError(f"epoch {e} is already proposed: {what}",
                             "approve that proposal or let it be decided first, then run this command again")
        key, data = epochs.proposal(fed.id, head, change, members, by, from_round)
        _put(fed.storage, key, data, f"site {by.site!r} already proposed another change for epoch {e}", by)
        sha, approvers = sha256_hex(data), ()
    if by.site not in approvers:
        akey, adata = epochs.approval(fed.id, e, from_round, sha, by)
        _put(fed.storage, akey, adata, f"site {by.site!r} already approved another proposal for epoch {e}", by)
        approvers = tuple(sorted((*approvers, by.site)))
    need = epochs.quorum(fed.settings.admission_quorum, len(head.members))
    who = members.get(change["site"])
    late = [p.key for p in fed.log.open if p not in live and p.epoch.change == change]
    return Outcome(e, change, approvers, need, tuple(s for s in sorted(head.members) if s not in approvers),
                   who.fingerprint() if who else None, from_round, late[0] if late else None)


def _put(storage: Storage, key: str, data: bytes, taken: str, by: Identity) -> None:
    """Create-only, at the first slot of `key` that is free (docs/design.md section 3):
    junk at a predictable key costs a slot; a record this member signed there already
    (another vote) is refused, identical bytes (a retry) succeed."""
    for i in range(layout.MAX_SLOTS):
        at = layout.slot(key, i)
        try:
            storage.put_new(at, data)
            return
        except FileExistsError:
            try:
                open_record(storage.get(at), authors={by.site: by.public()}, name=key)
            except IntegrityError:
                continue  # not this member's record: junk, or a forgery; the next slot
            raise SetupError(taken, "a member approves at most one proposal per epoch; "
                                    "wait until that epoch is decided (p2pfed status)") from None
    raise IntegrityError(f"{key}: all {layout.MAX_SLOTS} slots hold objects that do not count",
                         "someone with write access is filling the storage with junk; remove it and alert the members")


def _require_member(fed: Federation, by: Identity, command: str) -> None:
    if by.site not in fed.members:
        raise SetupError(f"site {by.site!r} is not a member and cannot admit anyone",
                         f"ask a member ({', '.join(sorted(fed.members))}) to run `{command}`")
    if fed.members[by.site] != by.public():
        raise IntegrityError(f"epoch {fed.log.head.number} lists other keys for {by.site!r} than this site's",
                             "a member admitted other keys under this site's name; alert the members")


def same_fingerprint(given: str, expected: str) -> bool:
    """Compare a typed or pasted fingerprint: separators (spaces, '-', ':') and case ignored."""
    return hmac.compare_digest(re.sub(r"[\s:-]", "", given).lower().encode(), expected.encode())


# --------------------------------------------------------------------------- loading
def load(storage: Storage, pinned_genesis: str | None = None, cache: Path | None = None,
         pending: bool = True) -> Federation:
    """Read and verify federation.json, members and join requests.

    `pinned_genesis` is the sha256 a site recorded at init/join: a replaced or rolled
    back federation.json is refused. `cache`: a folder of member records this site has
    verified before; a tick reads those from it instead of the storage (a member list
    is still listed every time, so a deleted member is noticed; `verify` re-reads all).
    `pending=False` skips join requests (a tick after the start has no use for them, and
    anyone can write many)."""
    try:
        data = storage.get(layout.FEDERATION)
    except FileNotFoundError:
        raise SetupError(f"no federation at {storage.url}",
                         "check the storage URL, or create one with `p2pfed init`") from None
    genesis_sha = sha256_hex(data)
    if pinned_genesis and genesis_sha != pinned_genesis:
        raise IntegrityError("federation.json differs from the one this site joined",
                             "the shared storage was changed or points to another federation")
    try:
        founder = PublicIdentity.from_json(_record_body(data, layout.FEDERATION)["founder"], layout.FEDERATION)
    except (KeyError, TypeError):
        raise IntegrityError(f"{layout.FEDERATION}: not a p2pfed federation record") from None
    body, _ = open_record(data, authors={founder.site: founder}, name=layout.FEDERATION,
                          expect={"kind": "federation"})
    if body.get("format") != FORMAT:
        raise IntegrityError(f"federation format {body.get('format')} is not supported",
                             "upgrade p2pfed on this site")
    schema.check(schema.RECORDS["federation"], body, f"{layout.FEDERATION}: body")
    fed = Federation(storage, body["federation"], genesis_sha, Settings.from_json(body["settings"]),
                     founder.site, body.get("versions", {}), int(body.get("created", 0)),
                     body.get("dataset_schema", {}))
    _load_members(fed, founder, cache)
    if pending:
        _load_pending(fed)
    return fed


def _load_members(fed: Federation, founder: PublicIdentity, cache: Path | None = None) -> None:
    """Verify the membership chain from the genesis (epochs.load); `cache` holds chain
    records this site verified before (read from there, not fetched again)."""
    def read(key: str) -> bytes:
        kept = cache / key if cache else None
        return kept.read_bytes() if kept and kept.exists() else fed.storage.get(key)

    genesis = epochs.Epoch(0, fed.genesis_sha256, {founder.site: founder})
    fed.log = epochs.load(lambda: fed.storage.list_prefix("epochs"), read, fed.id, genesis,
                          fed.settings.admission_quorum)
    fed.members = dict(fed.log.head.members)
    fed.admitted_by = fed.log.admitted_by()
    if cache is not None:
        for key, data in fed.log.records.items():
            if not (cache / key).exists():
                (cache / key).parent.mkdir(parents=True, exist_ok=True)
                atomic_write(cache / key, data)


def _load_pending(fed: Federation) -> None:
    fed.pending = {}
    for key in fed.storage.list_prefix("joins"):
        site = layout.site_of(key, "join")
        if site is None:
            continue  # not a join request's name: foreign junk, reported by `verify`
        if site in fed.members:
            continue
        data = fed.storage.get(key)
        try:
            ident = PublicIdentity.from_json(_record_body(data, key).get("identity", {}), key)
            open_record(data, authors={site: ident}, name=key,
                        expect=fed.expect("join", site=site, name=key, author=site))
        except IntegrityError:
            continue  # a broken join request is nobody's member; `verify` reports it
        if ident.site == site:
            fed.pending[site] = ident


def _record_body(data: bytes, name: str) -> dict:
    """The unverified body of a record, to find which key verifies it."""
    try:
        body = json.loads(data)["body"]
        return body if isinstance(body, dict) else {}
    except (ValueError, KeyError, TypeError):
        raise IntegrityError(f"{name}: not a p2pfed signed record") from None


def check_versions(fed: Federation) -> None:
    """The versions federation.json pins: nnunetv2 exactly (it makes the plans and the
    network), p2pfed the same major.minor (stored bytes and merges change only with a
    minor release; patch releases may differ between sites)."""
    for package, digits in (("nnunetv2", None), ("p2pfed", 2)):
        want, have = fed.versions.get(package), version_of(package)
        if want and want.split(".")[:digits] != have.split(".")[:digits]:
            rule = f"{package}=={want}" if digits is None else f"{package} {'.'.join(want.split('.')[:2])}.x"
            raise SetupError(f"this site runs {package} {have}, the federation pins {want}",
                             f"install {rule} on this site (every site must run it)")


def check_pins(fed: Federation, kept: list[str]) -> list[str]:
    """The epoch chain a site verified before must still be there, unchanged: a rolled
    back or forked membership log is refused. Returns the chain to keep."""
    epochs.check_kept(fed.log, kept)
    return fed.log.hashes()
