"""How long does a tick take when it only has to wait? (Issue: "idle tick under 2 s".)

Builds a 2-site synthetic federation on a local folder, ticks until SiteA has
committed round 1 and waits for SiteB, then times N idle ticks of SiteA, each in a
fresh process as cron runs it, and checks that neither torch nor nnU-Net was
imported. Prints JSON.

    python benchmarks/idle_tick.py [--ticks 10] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from p2pfed import simulate

PROBE = ("import sys, runpy; sys.argv = ['p2pfed', 'round', '--site', 'SiteA', '--json', '--home', {home!r}];\n"
         "try:\n    runpy.run_module('p2pfed.cli.app', run_name='__main__')\nexcept SystemExit:\n    pass\n"
         "print('IMPORTED', 'torch' in sys.modules, 'nnunetv2' in sys.modules, file=sys.stderr)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ticks", type=int, default=10)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="p2pfed-idle-"))
    sim = simulate.setup(workdir, 2, init_args=["--configuration", "2d", "--rounds", "2", "--iterations-per-epoch", "2",
                                                 "--val-iterations", "1", "--no-final-validation"])
    for _ in range(10):  # until SiteA has committed round 1 and waits for SiteB
        report = sim.tick("SiteA")
        if report["phase"] == "round" and not report["actions"]:
            break
        if report["phase"] == "fingerprint" or report["phase"] == "plan":
            sim.tick("SiteB")
    times, imported = [], []
    for _ in range(args.ticks):
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", PROBE.format(home=str(sim.home))],
                              capture_output=True, text=True, check=True)
        times.append(time.perf_counter() - started)
        imported.append(proc.stderr.strip().splitlines()[-1])
        waiting = json.loads(proc.stdout)
    print(json.dumps({"idle_tick_seconds": {"mean": round(statistics.mean(times), 3), "max": round(max(times), 3),
                                            "min": round(min(times), 3), "n": len(times)},
                      "torch_or_nnunet_imported": any("True" in line for line in imported),
                      "waiting": waiting["message"]}, indent=2))


if __name__ == "__main__":
    main()
