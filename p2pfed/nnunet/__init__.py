"""The nnU-Net adapter package. Everything that imports nnunetv2 lives here and is
imported lazily, so that idle ticks never pay for torch or nnU-Net.

nnU-Net reads nnUNet_raw/_preprocessed/_results at import time (nnunetv2.paths):
`activate()` must run before the first nnunetv2 import in a process."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from ..errors import SetupError

_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def activate(raw: str | Path, preprocessed: str | Path, results: str | Path) -> None:
    """Point nnU-Net at one site's folders. Refuses to switch once nnunetv2 is loaded."""
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
