"""What the membership commands do: init, join, admit. Each is one function the CLI calls."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from . import federation as fedmod
from . import ffe
from . import layout
from .crypto import Identity, PublicIdentity
from .dataset import check_trainable, dataset_json
from .errors import SetupError, UsageError
from .federation import Federation, Settings
from .site import DEVICES, SiteConfig, SiteHome
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
    try:  # before anything is written to the shared storage
        home.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise SetupError(f"cannot write the site home {home.dir}: {exc.strerror}",
                         "use --home or P2PFED_HOME to pick a writable folder") from None
    folders = {"nnunet_raw": _folder(opts.nnunet_raw, "nnUNet_raw", "--nnunet-raw"),
               "nnunet_preprocessed": _folder(opts.nnunet_preprocessed, "nnUNet_preprocessed",
                                              "--nnunet-preprocessed"),
               "nnunet_results": _folder(opts.nnunet_results, "nnUNet_results", "--nnunet-results")}
    # a missing or malformed dataset fails here, not days later in a cron log
    info = ffe.dataset_info(dataset_json(folders["nnunet_raw"], opts.dataset))
    return home, folders, info


def check_schema(fed: Federation, site: str, info: dict) -> None:
    """Labels, channels and file ending must match the federation's before anything is shared."""
    ffe.merge_dataset_info({fed.founder: {**fed.schema, "numTraining": 0}, site: info})


def _save(home: SiteHome, opts: LocalOptions, folders: dict, identity: Identity, storage: Storage,
          fed_id: str, genesis: str) -> SiteConfig:
    config = SiteConfig(site=opts.site, storage=storage.url,
                        federation=fed_id, genesis_sha256=genesis, dataset=opts.dataset,
                        device=opts.device, endpoint_url=opts.endpoint_url, **folders)
    home.create(identity, config)
    return config


def init(storage_url: str, opts: LocalOptions, settings: Settings) -> tuple[SiteConfig, PublicIdentity]:
    home, folders, info = _prepare(opts)
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
    fed_id, genesis = fedmod.create(storage, identity, settings, schema)
    return _save(home, opts, folders, identity, storage, fed_id, genesis), identity.public()


def join(storage_url: str, opts: LocalOptions) -> tuple[SiteConfig, PublicIdentity, Federation]:
    home, folders, info = _prepare(opts)
    storage = open_storage(storage_url, opts.endpoint_url)
    fed = fedmod.load(storage)
    check_schema(fed, opts.site, info)
    check_trainable(folders["nnunet_raw"], folders["nnunet_preprocessed"], opts.dataset, fed.settings.fold)
    identity = Identity.generate(opts.site)
    fedmod.request_join(storage, fed, identity)
    config = _save(home, opts, folders, identity, storage, fed.id, fed.genesis_sha256)
    return config, identity.public(), fed


def open_site(home_dir: str | None, site: str) -> tuple[SiteHome, SiteConfig, Federation]:
    """Load a site's home and its verified view of the federation, with pins checked."""
    home = SiteHome(home_dir, site)
    config = home.config()
    storage = open_storage(config.storage, config.endpoint_url)
    fed = fedmod.load(storage, pinned_genesis=config.genesis_sha256)
    state = home.state()
    pins = fedmod.check_pins(fed, state.get("known_members", {}))
    if pins != state.get("known_members"):
        state["known_members"] = pins
        home.save_state(state)
    return home, config, fed


def admit(home_dir: str | None, site: str, name: str, fingerprint: str | None) -> PublicIdentity:
    home, _, fed = open_site(home_dir, site)
    started = fed.storage.exists(layout.FINGERPRINT_SEAL)
    return fedmod.admit(fed, name, home.identity(), fingerprint, started)
