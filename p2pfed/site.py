"""A site's home: its private keys (mode 0600), its settings and its local state.

Layout: <home>/sites/<site>/{site.json, signing.pem, encryption.pem, state.json, tick.lock,
tick.log}. Everything in the home is written under the site's tick lock (`lock()`, re-entrant
within a process), by write-temp-fsync-rename.
Several sites can share one home root (that is how tests and the demo simulate a
federation on one machine), each with its own nnU-Net folders."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import stat
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator

from .crypto import Identity
from .errors import SetupError

DEVICES = ("cpu", "cuda", "mps")


class TickBusy(Exception):
    """Another tick of this site holds the lock (not an error: cron fired again)."""


def home_root(home: str | Path | None) -> Path:
    return Path(home or os.environ.get("P2PFED_HOME") or "~/.p2pfed").expanduser().absolute()


@dataclass(frozen=True)
class SiteConfig:
    """Per-site settings, fixed at init/join."""

    site: str
    storage: str
    federation: str
    genesis_sha256: str
    dataset: str
    nnunet_raw: str
    nnunet_preprocessed: str
    nnunet_results: str
    device: str = "cpu"
    endpoint_url: str | None = None
    region: str | None = None  # S3 only, like the profile name: what cron's environment lacks
    aws_profile: str | None = None  # a name in ~/.aws/{config,credentials}; never a secret

    @classmethod
    def from_json(cls, obj: dict) -> "SiteConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in obj.items() if k in names})


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write-then-rename so a crash leaves the old file or the new one, never half of one.

    The temporary name is unique (two writers never share it) and the folder is fsynced
    after the rename, so the new name survives a power cut."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:  # disk full, read-only or removed folder: the old file is intact
        raise SetupError(f"cannot write {path}: {exc.strerror or exc}",
                         "free disk space or fix the permissions of the site home; "
                         "the previous version of the file is intact") from None


class SiteHome:
    def __init__(self, root: str | Path | None, site: str):
        self.root = home_root(root)
        self.site = site
        self.dir = self.root / "sites" / site

    @property
    def exists(self) -> bool:
        return (self.dir / "site.json").exists()

    def others(self) -> list[str]:
        base = self.root / "sites"
        return sorted(p.name for p in base.iterdir() if (p / "site.json").exists()) if base.is_dir() else []

    def create(self, identity: Identity, config: SiteConfig) -> None:
        """Write keys first, settings last: a home with site.json is complete."""
        self.save_keys(identity)
        self.save_config(config)

    def save_keys(self, identity: Identity, prefix: str = "") -> None:
        """`prefix` "next.": keys proposed by `rotate-keys`, not in force yet."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            signing, encryption = identity.private_pems()
            atomic_write(self.dir / f"{prefix}signing.pem", signing, 0o600)
            atomic_write(self.dir / f"{prefix}encryption.pem", encryption, 0o600)
        except OSError as exc:
            raise SetupError(f"cannot write the site home {self.dir}: {exc.strerror}",
                             "use --home or P2PFED_HOME to pick a writable folder") from None

    @contextlib.contextmanager
    def creating(self) -> Iterator[None]:
        """For init/join: if the command fails, remove the site's folder again when this
        command made it, so a failed command leaves no half-made home."""
        made = not self.dir.exists()
        try:
            yield
        except BaseException:
            if made:
                shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def save_config(self, config: SiteConfig) -> None:
        atomic_write(self.dir / "site.json", json.dumps(asdict(config), indent=2).encode())

    def config(self) -> SiteConfig:
        if not self.exists:
            known = ", ".join(self.others()) or "none"
            raise SetupError(f"site {self.site!r} is not set up in {self.root} (sites here: {known})",
                             "run `p2pfed init` or `p2pfed join` first, or pass the right --site/--home")
        try:
            return SiteConfig.from_json(json.loads((self.dir / "site.json").read_text()))
        except (ValueError, TypeError) as exc:
            raise SetupError(f"{self.dir / 'site.json'} is corrupt: {exc}",
                             "restore it from a backup or re-join with a new site name") from None

    def next_identity(self) -> Identity | None:
        """The keys `rotate-keys` proposed, or None."""
        return self.identity("next.") if (self.dir / "next.signing.pem").exists() else None

    def promote_next_keys(self) -> Identity:
        """The rotated keys are in force: they replace the old ones, which are deleted."""
        new = self.identity("next.")
        self.save_keys(new)  # a crash in between leaves next.* for the next tick to promote again
        for name in ("signing.pem", "encryption.pem"):
            (self.dir / f"next.{name}").unlink()
        return new

    def identity(self, prefix: str = "") -> Identity:
        pems = []
        for name in (f"{prefix}signing.pem", f"{prefix}encryption.pem"):
            path = self.dir / name
            try:
                mode = stat.S_IMODE(path.stat().st_mode)
                if mode & 0o077:
                    raise SetupError(f"private key {path} is readable by others (mode {mode:o})",
                                     f"chmod 600 {path}")
                pems.append(path.read_bytes())
            except FileNotFoundError:
                raise SetupError(f"private key {path} is missing",
                                 "restore the site home from a backup") from None
        try:
            return Identity.from_pems(self.site, *pems)
        except (ValueError, TypeError):
            raise SetupError(f"private keys in {self.dir} are corrupt",
                             "restore the site home from a backup") from None

    # -- local state ----------------------------------------------------------------------------
    def state(self) -> dict:
        path = self.dir / "state.json"
        try:
            return json.loads(path.read_text()) if path.exists() else {}
        except ValueError:
            raise SetupError(f"{path} is corrupt", "restore it, or delete it to re-derive state "
                             "from the shared storage") from None

    def save_state(self, state: dict) -> None:
        atomic_write(self.dir / "state.json", json.dumps(state, indent=2, sort_keys=True).encode())

    def work(self, *parts: str) -> Path:
        path = self.dir.joinpath("work", *parts)
        path.mkdir(parents=True, exist_ok=True)
        return path

    _held: set[Path] = set()  # lock files this process holds: lock() is re-entrant

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """One writer per site at a time (a tick, or `status`/`verify` saving pins).
        flock is released by the kernel if we are killed. TickBusy if another process holds it."""
        path = self.dir / "tick.lock"
        if path in SiteHome._held:
            yield
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise TickBusy() from None
            SiteHome._held.add(path)
            try:
                yield
            finally:
                SiteHome._held.discard(path)
        finally:
            os.close(fd)
