"""The nnU-Net adapter package. Everything that imports nnunetv2 lives here and is
imported lazily, so that idle ticks never pay for torch or nnU-Net.

nnU-Net reads nnUNet_raw/_preprocessed/_results at import time (nnunetv2.paths):
`activate()` must run before the first nnunetv2 import in a process."""
from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path

from ..errors import SetupError

_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
_reaper_installed = False
_parent_pid = os.getpid()


def _remember_parent() -> None:
    global _parent_pid
    _parent_pid = os.getpid()


def _die_with_parent() -> None:
    """In a forked child: get SIGKILL when the parent dies (Linux prctl PR_SET_PDEATHSIG).

    nnU-Net's augmentation workers (batchgenerators) block on a queue forever once
    their tick is killed; under cron they would pile up, 1 GB each."""
    parent = _parent_pid
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _install_reaper() -> None:
    global _reaper_installed
    if not _reaper_installed and sys.platform.startswith("linux"):
        _reaper_installed = True
        os.register_at_fork(before=_remember_parent, after_in_child=_die_with_parent)


def activate(raw: str | Path, preprocessed: str | Path, results: str | Path) -> None:
    """Point nnU-Net at one site's folders. Refuses to switch once nnunetv2 is loaded."""
    _install_reaper()
    wanted = dict(zip(_VARS, (str(raw), str(preprocessed), str(results))))
    if "nnunetv2.paths" in sys.modules:
        import nnunetv2.paths as paths

        loaded = {v: str(getattr(paths, v)) for v in _VARS}
        if loaded != wanted:
            raise SetupError(
                "nnU-Net was already imported with other folders in this process",
                "run each site in its own process",
            )
        return
    for name, value in wanted.items():
        Path(value).mkdir(parents=True, exist_ok=True)
        os.environ[name] = value
    # torch.compile is slow to warm up and renames keys; the merge copes with it, but a
    # one-round-per-process tick gains nothing from compiling.
    os.environ.setdefault("nnUNet_compile", "false")
