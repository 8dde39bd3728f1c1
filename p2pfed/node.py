"""What the membership commands do: init, join, admit. Each is one function the CLI calls."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

from . import federation as fedmod
from . import ffe
from . import layout
from .crypto import Identity, PublicIdentity, sha256_hex
from .dataset import check_trainable, dataset_json
from .errors import IntegrityError, SetupError, UsageError
from .federation import Federation, Settings
from .protocol.modes import mode_of
from .site import DEVICES, SiteConfig, SiteHome, TickBusy
from .storage import Storage, open_storage, probe


@dataclass(frozen=True)
class LocalOptions:
    """Site settings given at init/join."""

    site: str
    dataset: str
    nnunet_raw: str | None = None
    nnunet_preprocessed: str | None = None
    nnunet_results: str | None = None
    device: str = "cpu"
    endpoint_url: str | None = None
    home: str | None = None


def _folder(given: str | None, env: str, flag: str) -> str:
    value = given or os.environ.get(env)
    if not value:
        raise SetupError(f"{env} is not set", f"pass {flag} or export {env}")
    return str(Path(value).expanduser().absolute())


def _prepare(opts: LocalOptions) -> tuple[SiteHome, dict, dict]:
    if not layout.valid_site(opts.site):
        raise UsageError(f"invalid site name {opts.site!r}",
                         "use letters, digits, '.', '_' or '-' (at most 63), starting with a letter or digit")
    if opts.device not in DEVICES:
        raise UsageError(f"--device must be one of {', '.join(DEVICES)}")
    home = SiteHome(opts.home, opts.site)
    if home.exists:
        raise SetupError(f"site {opts.site!r} already exists in {home.root}",
                         "use another --home, or another --site name")
    folders = {"nnunet_raw": _folder(opts.nnunet_raw, "nnUNet_raw", "--nnunet-raw"),
               "nnunet_preprocessed": _folder(opts.nnunet_preprocessed, "nnUNet_preprocessed",
                                              "--nnunet-preprocessed"),
               "nnunet_results": _folder(opts.nnunet_results, "nnUNet_results", "--nnunet-results")}
    # a missing or malformed dataset fails here, not days later in a cron log
    info = ffe.dataset_info(dataset_json(folders["nnunet_raw"], opts.dataset))
    return home, folders, info


def _writable(home: SiteHome) -> None:
    """Before anything is written to the shared storage (removed again if the command fails)."""
    try:
        home.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise SetupError(f"cannot write the site home {home.dir}: {exc.strerror}",
                         "use --home or P2PFED_HOME to pick a writable folder") from None


def storage_settings(url: str, endpoint: str | None) -> dict:
    """What a cron job needs to reach S3 and its environment may lack: the endpoint, the
    region and the profile name, from the flag or this shell's environment. Never secrets:
    credentials stay in the profile's files or the environment (README, "Cron")."""
    if not url.startswith(("s3://", "s3a://")):
        return {"endpoint_url": endpoint}
    env = os.environ.get
    return {"endpoint_url": endpoint or env("AWS_ENDPOINT_URL_S3") or env("AWS_ENDPOINT_URL"),
            "region": env("AWS_REGION") or env("AWS_DEFAULT_REGION"), "aws_profile": env("AWS_PROFILE")}


def _config(opts: LocalOptions, folders: dict, storage: Storage, fed_id: str, genesis: str) -> SiteConfig:
    return SiteConfig(site=opts.site, storage=storage.url, federation=fed_id, genesis_sha256=genesis,
                      dataset=opts.dataset, device=opts.device,
                      **storage_settings(storage.url, opts.endpoint_url), **folders)


def check_schema(fed: Federation, site: str, info: dict) -> None:
    """Labels, channels and file ending must match the federation's before anything is shared
    (in asym, the channels' modalities may differ: its mode says)."""
    ffe.merge_dataset_info({fed.founder: {**fed.schema, "numTraining": 0}, site: info},
                           same_modalities=mode_of(fed.settings).same_modalities)


def init(storage_url: str, opts: LocalOptions, settings: Settings) -> tuple[SiteConfig, PublicIdentity]:
    """Keys are saved before anything is shared; a failed init leaves no site home."""
    home, folders, info = _prepare(opts)
    with home.creating():
        _writable(home)
        storage = open_storage(storage_url, opts.endpoint_url)
        if storage.exists(layout.FEDERATION):
            raise SetupError(f"a federation already exists at {storage.url}",
                             "use `p2pfed join` to join it, or pick another storage location")
        identity = Identity.generate(opts.site)
        check_trainable(folders["nnunet_raw"], folders["nnunet_preprocessed"], opts.dataset, settings.fold)
        schema = {k: v for k, v in info.items() if k != "numTraining"}
        # The probe is the first write, after every local check: a mistake found here leaves
        # nothing in the storage (objects cannot be deleted there). See docs/design.md, section 2.
        probe(storage)
        fed_id, genesis = fedmod.genesis_record(identity, settings, schema)
        home.save_keys(identity)
        fedmod.publish(storage, fed_id, genesis, identity)
    config = _config(opts, folders, storage, fed_id, sha256_hex(genesis))
    home.save_config(config)  # last: a home with site.json is complete
    return config, identity.public()


def join(storage_url: str, opts: LocalOptions, federation: str | None = None,
         confirm: Callable[[Federation], bool] | None = None) -> tuple[SiteConfig, PublicIdentity, Federation]:
    """Keys are saved before the join request is shared; a failed join leaves no site home.

    The joiner authenticates the federation before anything is written: `federation` is
    the fingerprint the founder gave out of band (`p2pfed init` printed it); without
    it, `confirm(fed)` (a person at a terminal comparing it) must say yes."""
    home, folders, info = _prepare(opts)
    with home.creating():
        _writable(home)
        storage = open_storage(storage_url, opts.endpoint_url)
        fed = fedmod.load(storage)
        authenticate(fed, federation, confirm)
        refuse_if_finished(fed)
        check_schema(fed, opts.site, info)
        check_trainable(folders["nnunet_raw"], folders["nnunet_preprocessed"], opts.dataset, fed.settings.fold)
        identity = Identity.generate(opts.site)
        home.save_keys(identity)
        fedmod.request_join(storage, fed, identity)
    config = _config(opts, folders, storage, fed.id, fed.genesis_sha256)
    home.save_config(config)  # last: a home with site.json is complete
    return config, identity.public(), fed


def authenticate(fed: Federation, fingerprint: str | None, confirm: Callable[[Federation], bool] | None) -> None:
    """The storage could show a forged federation.json signed by anyone (its id and
    founder's name are copied easily): only its fingerprint, compared out of band, tells."""
    if fingerprint is not None:
        if not fedmod.same_fingerprint(fingerprint, fed.genesis_sha256):
            # never print the storage's value: an impostor wants it pasted back
            raise IntegrityError(f"the federation at {fed.storage.url} has another fingerprint than the one given",
                                 "do not join: check the storage URL and ask the founder for the fingerprint "
                                 "`p2pfed init` printed")
    elif confirm is None:
        raise UsageError("join needs --federation FINGERPRINT when it cannot ask at a terminal",
                         "ask the founder for the federation fingerprint `p2pfed init` printed")
    elif not confirm(fed):
        raise UsageError("not joined: the federation fingerprint was not confirmed",
                         "compare it with the founder's, then run join again (or pass --federation)")


def refuse_if_finished(fed: Federation) -> None:
    """A running federation admits new sites (from a later round); a finished one does not."""
    if fed.storage.exists(layout.FINGERPRINT_SEAL) and any(True for _ in fed.storage.list_prefix("final")):
        raise SetupError(f"the federation at {fed.storage.url} has finished; it admits no new sites",
                         "ask its members to start a new federation with you")


def open_site(home_dir: str | None, site: str, endpoint: str | None = None,
              cached: bool = False) -> tuple[SiteHome, SiteConfig, Federation]:
    """Load a site's home and its verified view of the federation, with pins checked.

    `endpoint` overrides the one recorded at init/join. The recorded region and profile
    apply unless this environment sets its own. `cached` (ticks): member records this
    site verified before are read from its home, not fetched again."""
    home = SiteHome(home_dir, site)
    config = home.config()
    _recorded_aws_settings(config)
    storage = open_storage(config.storage, endpoint or config.endpoint_url)
    state = home.state()
    # a started site's ticks need neither re-verified member records nor join requests
    fed = fedmod.load(storage, pinned_genesis=config.genesis_sha256, cache=home.dir / "cache" if cached else None,
                      pending=not (cached and "participants" in state))
    pins = fedmod.check_pins(fed, state.get("epochs", []))
    if pins != state.get("epochs"):
        _save_pins(home, pins)
    return home, config, fed


def _recorded_aws_settings(config: SiteConfig) -> None:
    """cron starts with an empty environment: fill in what init/join recorded."""
    if config.aws_profile and not os.environ.get("AWS_PROFILE"):
        os.environ["AWS_PROFILE"] = config.aws_profile
    if config.region and not (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")):
        os.environ["AWS_DEFAULT_REGION"] = config.region


def _save_pins(home: SiteHome, pins: dict) -> None:
    """Only under the site's lock: a running tick owns state.json and pins it itself."""
    try:
        with home.lock():
            state = home.state()
            state["epochs"] = pins
            home.save_state(state)
    except TickBusy:
        pass


def admit(home_dir: str | None, site: str, name: str, fingerprint: str,
          endpoint: str | None = None) -> fedmod.Outcome | None:
    home, _, fed = open_site(home_dir, site, endpoint)
    open_round = _open_round(home, fed)
    return fedmod.admit(fed, name, home.identity(), fingerprint, open_round)


def remove(home_dir: str | None, site: str, name: str, endpoint: str | None = None) -> fedmod.Outcome | None:
    home, _, fed = open_site(home_dir, site, endpoint)
    return fedmod.remove(fed, name, home.identity(), _open_round(home, fed))


def rotate_keys(home_dir: str | None, site: str, endpoint: str | None = None) -> fedmod.Outcome:
    """New keys, kept beside the old ones until the epoch that names them is in force."""
    home, _, fed = open_site(home_dir, site, endpoint)
    new = home.next_identity()
    if new is None:
        new = Identity.generate(site)
        home.save_keys(new, prefix="next.")
    return fedmod.rotate(fed, home.identity(), new, _open_round(home, fed))


def _open_round(home: SiteHome, fed: Federation) -> int | None:
    """The first unsealed round as this site sees it, or None before the start."""
    from .protocol.view import View

    view = View(fed, home, home.state())
    return view.current_round() if view.start_seal() is not None else None
