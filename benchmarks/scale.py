"""Scale: bytes, storage requests, round wall time and peak RSS per site, by number of sites.

N sites (default 3, 10, 25, 50), each a separate node with its own home, run a whole
federation (FFE, full aggregation, --rounds rounds) on the numpy federation of
tests/factory.py (the real protocol without nnU-Net). The trainer does not train: its
weights are float32 arrays shaped like a small nnU-Net (benchmarks/secagg.py's U-Net-like
tensors, exactly --params parameters, default 1 M; `--params 0`: factory's three-tensor
model), and "training" adds seeded noise. Setup (declare, fingerprint, plan) runs first,
counted apart; then every site ticks round-robin, in-process, until all have finished.
Per variant (`VARIANTS`: plain; secure: secure aggregation, every site merging every
masked upload; sharded: secure aggregation, sharded from 3 sites) and N:

- up / down: bytes a site uploads (put_new) and downloads (get) per round, mean and
  max over sites: everything from its first round tick to its finish (so round 1's
  download of the initial model, the final merge and the final metrics too) over --rounds;
  "further rounds": the download without what a site reads once (the initial model of
  round 0, the final metrics), also as a multiple of M, one contribution as stored (8
  bytes a parameter masked, 4 plain); the JSON's `down_by_kind` splits it by object kind;
- requests: storage requests (get, exists, list_prefix, put_new, counted as in
  benchmarks/idle_requests.py) per tick, mean over ticks: idle (no action and no write:
  waiting for the others; site0 ticks once more whenever it waits, and that extra tick
  counts here only) and working (an action, or a write: a reveal comes without one);
  `listed` is the mean number of keys an idle tick's listings returned (on S3 a LIST
  request returns at most 1000 keys);
- round s: wall time of a round, from its opening (round 1: the first round tick; round
  r: the tick that sealed r-1) to the end of the tick after which every site has merged
  it, mean over rounds, summing the time spent inside ticks (the sites tick one after
  the other on one machine: this is N sites' work, not one site's); `round CPU s` the
  same in CPU seconds of the ticking process (time.process_time: less sensitive to a
  loaded machine);
- peak RSS: the last site ticks in a fresh process, as cron runs it
  (`scale.py --child`); its largest VmHWM over its ticks, and the largest growth over
  the RSS the process had before its tick (interpreter, numpy, p2pfed imported).

Storage: a local folder per run (default), or the S3-protocol server of the tests (moto,
on loopback; requests there are counted the same, bytes are payload bytes).

    .venv/bin/python benchmarks/scale.py [--sites 3,10,25,50] [--rounds 2]
        [--variants plain,secure] [--params 1000000] [--storage local|s3] [--json PATH] [--quick]

--quick: 3 and 5 sites, a few seconds per variant (a smoke run)."""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT, TESTS = BENCH.parent, BENCH.parent / "tests"
for p in (str(ROOT), str(TESTS)):
    if p not in sys.path:
        sys.path.append(p)

import factory  # noqa: E402  (tests/factory.py)
from p2pfed import layout, storage  # noqa: E402
from p2pfed.federation import Settings  # noqa: E402
from p2pfed.protocol import Trained  # noqa: E402
from p2pfed.site import SiteHome  # noqa: E402

# --------------------------------------------------------------------------- variants
_FIELDS = {f.name for f in dataclasses.fields(Settings)}
# `secure` is full aggregation: every site merges every masked upload. Since sharded
# aggregation (docs/design.md 7.9) a secure round of `sharded_from` key-sealed sites or more
# (default 8) is sharded: `secure` sets it out of reach (a checkout before it needs nothing).
_NEVER_SHARDED = {"sharded_from": 10**6} if "sharded_from" in _FIELDS else {}
# Federation settings of each variant (besides factory.make's defaults and --rounds).
VARIANTS = {
    "plain": {"secure_aggregation": False},
    "secure": {"secure_aggregation": True, **_NEVER_SHARDED},
    # ---- sharded aggregation: a secure round of at least max(sharded_from, 3) sites is sharded ----
    "sharded": {"secure_aggregation": True, "sharded_from": 2},
}
DEFAULT_VARIANTS = "plain,secure"
MIN_SECURE = 3  # a secure group has at least 3 sites


# --------------------------------------------------------------------------- the model
@functools.lru_cache(maxsize=1)
def _bench_secagg():
    """benchmarks/secagg.py, under another name (p2pfed.secagg is `secagg` there)."""
    spec = importlib.util.spec_from_file_location("bench_secagg", BENCH / "secagg.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=4)
def shaped_model(params: int, seed: int) -> dict[str, np.ndarray]:
    """float32 tensors named and shaped like a small nnU-Net, exactly `params` parameters."""
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape, dtype=np.float32) * np.float32(0.05)
            for name, shape in _bench_secagg().model_shapes(params)}


class ShapedTrainer(factory.NumpyTrainer):
    """NumpyTrainer with nnU-Net-shaped weights of PARAMS parameters (set before use)."""

    PARAMS = 1_000_000

    def initial_weights(self):
        return dict(shaped_model(self.PARAMS, 0))

    def train(self, r, base) -> Trained:
        start = base if base is not None else shaped_model(self.PARAMS, factory.cases_of(self.site))
        return Trained(factory.trained(start, self.site, r), factory.cases_of(self.site), r - 1, {})


def trainer_for(params: int) -> type:
    if params <= 0:
        return factory.NumpyTrainer
    ShapedTrainer.PARAMS = params
    return ShapedTrainer


# --------------------------------------------------------------------------- counting
class Counter:
    """Storage requests and payload bytes, per kind, while `on`."""

    KINDS = ("get", "exists", "list_prefix", "put_new")

    def __init__(self):
        self.on = False
        self.reset()

    def reset(self) -> None:
        self.requests, self.up, self.down, self.listed = collections.Counter(), 0, 0, 0
        # object kind (layout.kind_name) -> bytes downloaded; "once: kind" for the initial
        # model (round 0) and the final metrics, which a site reads once, not every round
        self.down_by = collections.Counter()

    def snapshot(self) -> dict:
        return {"requests": sum(self.requests.values()), "by_kind": dict(self.requests),
                "up": self.up, "down": self.down, "listed": self.listed, "down_by": dict(self.down_by)}

    def install(self) -> None:
        """Wrap the Storage methods a tick uses (on the class: every tick opens its own)."""
        def wrap(name, fn):
            def counted(this, *a, **k):
                if self.on:
                    self.requests[name] += 1  # before the call: one that raises (an absent key) counts too
                result = fn(this, *a, **k)
                if self.on:
                    self._bytes(name, a, result)
                return result
            return counted

        for name in self.KINDS:
            fn = getattr(storage.Storage, name)
            setattr(storage.Storage, name, functools.wraps(fn)(wrap(name, fn)))

    def _bytes(self, name: str, args: tuple, result) -> None:
        if name == "get":
            self.down += len(result)
            once = layout.round_of(args[0]) == 0 or layout.kind_name(args[0]) == "final"
            self.down_by[("once: " if once else "") + layout.kind_name(args[0])] += len(result)
        elif name == "put_new":
            self.up += len(args[1])
        elif name == "list_prefix":
            self.listed += len(result)


def _status_mib(field: str) -> float:
    """VmRSS / VmHWM of this process (Linux; not ru_maxrss, which keeps the parent's peak)."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1]) / 1024


def child(home: str, site: str, params: int) -> None:
    """One tick of `site` in this fresh process, counted: its report on stdout, the
    figures on stderr (JSON, last line)."""
    counter = Counter()
    counter.install()
    trainer = trainer_for(params)
    if trainer is ShapedTrainer:
        _bench_secagg()  # imported before the baseline, like p2pfed
    from p2pfed import node
    from p2pfed.protocol import Tick

    before = _status_mib("VmRSS")
    counter.on = True
    started, cpu = time.perf_counter(), time.process_time()
    with SiteHome(home, site).lock():
        home_, config, fed = node.open_site(home, site, cached=True)
        report = Tick(home_, config, fed, trainer=trainer(site, home_)).run()
    tick_s, cpu_s = time.perf_counter() - started, time.process_time() - cpu
    counter.on = False
    print(json.dumps(report.to_json()))
    print(json.dumps({**counter.snapshot(), "tick_s": tick_s, "cpu_s": cpu_s, "rss_before_mib": before,
                      "peak_rss_mib": _status_mib("VmHWM")}), file=sys.stderr)


# --------------------------------------------------------------------------- one run
@dataclasses.dataclass
class TickRecord:
    site: str
    phase: str
    actions: list
    tick_s: float
    cpu_s: float
    counts: dict
    rss: dict | None = None


def run_child(fed: factory.Fed, site: str, params: int) -> tuple[factory.Report, dict]:
    cmd = [sys.executable, __file__, "--child", str(fed.home), site, str(params)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=fed.root,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        raise RuntimeError(f"the tick of {site} in a fresh process failed (exit {proc.returncode})")
    rep = json.loads(proc.stdout.strip().splitlines()[-1])
    figures = json.loads(proc.stderr.strip().splitlines()[-1])
    report = factory.Report(rep["site"], rep["phase"], rep["round"], rep["actions"], rep["waiting_for"],
                            rep["deadline"], rep["message"], rep["finished"], rep["junk"])
    return report, figures


def one_run(variant: str, n: int, args, counter: Counter, url_of, endpoint) -> dict:
    root = Path(tempfile.mkdtemp(prefix=f"p2pfed-scale-{variant}-{n}-"))
    trainer = trainer_for(args.params)
    probe = f"site{n - 1}"  # ticks in a fresh process: its peak RSS is its own
    try:
        t0 = time.perf_counter()
        fed = factory.make(root, url_of(), n=n, endpoint=endpoint, rounds=args.rounds, **VARIANTS[variant])
        make_s = time.perf_counter() - t0

        def tick(site: str, stop_after: str | None = None) -> tuple[TickRecord, factory.Report]:
            if site == probe and stop_after is None:
                report, fig = run_child(fed, site, args.params)
                counts = {k: fig[k] for k in ("requests", "by_kind", "up", "down", "listed", "down_by")}
                rss = {"peak_mib": fig["peak_rss_mib"], "growth_mib": fig["peak_rss_mib"] - fig["rss_before_mib"]}
                return TickRecord(site, report.phase, report.actions, fig["tick_s"], fig["cpu_s"], counts, rss), report
            counter.reset()
            counter.on = True
            started, cpu = time.perf_counter(), time.process_time()
            try:
                report = fed.run(site, trainer, **({"stop_after": stop_after} if stop_after else {}))
            finally:
                counter.on = False
            return TickRecord(site, report.phase, report.actions, time.perf_counter() - started,
                              time.process_time() - cpu, counter.snapshot()), report

        # setup: declare, fingerprint, plan, initial model (round-robin, counted apart)
        t0 = time.perf_counter()
        setup = collections.defaultdict(lambda: {"up": 0, "down": 0, "requests": 0})
        for _ in range(8):  # until the initial model is sealed (4 sweeps for 3 sites)
            if fed.storage.exists(layout.seal(0)):
                break
            for s in fed.sites:
                rec, _ = tick(s, stop_after="initial model")
                for k in ("up", "down", "requests"):
                    setup[s][k] += rec.counts[k]
        setup_s = time.perf_counter() - t0

        # rounds: round-robin until every site has finished
        clock, opened, closed, sweeps = (0.0, 0.0), {1: (0.0, 0.0)}, {}, 0
        merged = {s: 0 for s in fed.sites}  # merged_upto of each site
        per_site = {s: {"up": 0, "down": 0, "once": 0, "requests": 0, "ticks": 0} for s in fed.sites}
        down_by = collections.Counter()  # kind -> bytes, all sites, all rounds
        records: list[TickRecord] = []
        idle_extra: list[TickRecord] = []  # site0's extra ticks while it waits: neither bytes nor clock
        finished: set[str] = set()
        t0 = time.perf_counter()
        while len(finished) < n:
            sweeps += 1
            if sweeps > 4 * args.rounds + 12:
                raise RuntimeError(f"{variant}, {n} sites: not finished after {sweeps - 1} sweeps")
            for s in fed.sites:
                if s in finished:
                    continue
                rec, report = tick(s)
                while True:
                    records.append(rec)
                    clock = (clock[0] + rec.tick_s, clock[1] + rec.cpu_s)
                    for k in ("up", "down", "requests"):
                        per_site[s][k] += rec.counts[k]
                    per_site[s]["ticks"] += 1
                    down_by.update(rec.counts["down_by"])
                    per_site[s]["once"] += sum(v for k, v in rec.counts["down_by"].items() if k.startswith("once: "))
                    if report.finished:
                        finished.add(s)
                    _rounds_seen(s, SiteHome(fed.home, s).state(), merged, opened, closed, clock, args.rounds)
                    if s != fed.sites[0] or report.finished or not report.waiting_for:
                        break
                    # site0 waits for the others: what its next cron tick costs (apart, if it is idle)
                    rec, report = tick(s)
                    if not _worked(rec):
                        idle_extra.append(rec)
                        break
            print(f"  [{variant} n={n}] sweep {sweeps}: {len(finished)} finished, "
                  f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        rounds_s = time.perf_counter() - t0

        idle = [r for r in records if not _worked(r)] + idle_extra
        working = [r for r in records if _worked(r)]
        rss = [r.rss for r in records if r.rss]
        walls = [closed[r][0] - opened[r][0] for r in sorted(closed) if r in opened]
        cpus = [closed[r][1] - opened[r][1] for r in sorted(closed) if r in opened]
        up = [per_site[s]["up"] / args.rounds for s in fed.sites]
        down = [per_site[s]["down"] / args.rounds for s in fed.sites]
        steady = [(per_site[s]["down"] - per_site[s]["once"]) / args.rounds for s in fed.sites]
        kinds = collections.Counter()
        for r in working:
            kinds.update(r.counts["by_kind"])
        return {
            "variant": variant, "sites": n, "rounds": args.rounds, "params": args.params, "storage": args.storage,
            # M: one contribution as a site stores it, 8 bytes a parameter masked (secure), else 4
            "model_bytes": (8 if VARIANTS[variant].get("secure_aggregation") else 4) * _param_count(trainer),
            "up_mean": statistics.mean(up), "up_max": max(up), "up_max_site": fed.sites[up.index(max(up))],
            "down_mean": statistics.mean(down), "down_max": max(down),
            "down_max_site": fed.sites[down.index(max(down))],
            "down_by_kind": {k: v / n / args.rounds for k, v in down_by.most_common()},  # per site per round
            # without the once-only objects (initial model, final metrics): what every further round costs
            "down_round_mean": statistics.mean(steady), "down_round_max": max(steady),
            "setup_up_mean": statistics.mean(v["up"] for v in setup.values()),
            "setup_down_mean": statistics.mean(v["down"] for v in setup.values()),
            "idle_ticks": len(idle), "working_ticks": len(working),
            "idle_requests": _mean([r.counts["requests"] for r in idle]),
            "idle_requests_max": max((r.counts["requests"] for r in idle), default=None),
            "idle_listed": _mean([r.counts["listed"] for r in idle]),
            "idle_by_kind": dict(collections.Counter(k for r in idle for k, c in r.counts["by_kind"].items()
                                                     for _ in range(c))),
            "idle_down_mean": _mean([r.counts["down"] for r in idle]),
            "idle_tick_s_mean": _mean([r.tick_s for r in idle]),
            "working_requests": _mean([r.counts["requests"] for r in working]),
            "working_requests_max": max((r.counts["requests"] for r in working), default=None),
            "working_by_kind": {k: round(v / len(working), 1) for k, v in kinds.items()} if working else {},
            "round_s": [round(w, 2) for w in walls], "round_s_mean": _mean(walls),
            "round_cpu_s": [round(c, 2) for c in cpus], "round_cpu_s_mean": _mean(cpus),
            "tick_s_mean": _mean([r.tick_s for r in records]),
            "working_tick_s_max": max((r.tick_s for r in working), default=None),
            "working_tick_cpu_s_mean": _mean([r.cpu_s for r in working]),
            "sweeps": sweeps, "ticks_per_site": _mean([v["ticks"] for v in per_site.values()]),
            "peak_rss_mib": max((x["peak_mib"] for x in rss), default=None),
            "rss_growth_mib": max((x["growth_mib"] for x in rss), default=None),
            "ticks": [{"site": r.site, "idle_extra": extra, "actions": r.actions, "s": round(r.tick_s, 3),
                       "cpu_s": round(r.cpu_s, 3), **{k: r.counts[k] for k in ("requests", "up", "down", "listed")},
                       "by_kind": r.counts["by_kind"], **({"rss": r.rss} if r.rss else {})}
                      for extra, group in ((False, records), (True, idle_extra)) for r in group],
            "make_s": round(make_s, 1), "setup_s": round(setup_s, 1), "rounds_s": round(rounds_s, 1),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _param_count(trainer) -> int:
    return sum(int(a.size) for a in trainer("site0", None).initial_weights().values())


def _worked(rec: TickRecord) -> bool:
    """A working tick did something: an action, or a write (a reveal is written by a tick
    that reports no action)."""
    return bool(rec.actions) or rec.counts["by_kind"].get("put_new", 0) > 0


def _rounds_seen(site: str, state: dict, merged: dict, opened: dict, closed: dict, clock: tuple,
                 rounds: int) -> None:
    """After `site`'s tick (only its own state can have changed): round r opens when some
    site has entered it (the seal of r-1 is out); it closes when every site has merged it."""
    for r in range(2, min(state.get("round") or 0, rounds) + 1):
        opened.setdefault(r, clock)
    merged[site] = state.get("merged_upto") or 0
    for r in range(1, rounds + 1):
        if r not in closed and min(merged.values()) >= r:
            closed[r] = clock


def _mean(xs):
    return statistics.mean(xs) if xs else None


# --------------------------------------------------------------------------- output
def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:.2f}"


def _num(x, fmt="{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def table(rows: list[dict]) -> str:
    head = ["variant", "sites", "up MiB/site/round mean", "up max", "down MiB/site/round mean", "down max",
            "down, further rounds: mean", "max", "x M (mean / max)", "req idle tick", "req working tick", "listed keys idle", "round s", "round CPU s", "sweeps", "peak RSS MiB",
            "RSS growth MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["variant"], str(r["sites"]), _mib(r["up_mean"]), _mib(r["up_max"]), _mib(r["down_mean"]),
            _mib(r["down_max"]), _mib(r["down_round_mean"]), _mib(r["down_round_max"]),
            f"{r['down_round_mean'] / r['model_bytes']:.2f} / {r['down_round_max'] / r['model_bytes']:.2f}",
            _num(r["idle_requests"]), _num(r["working_requests"]),
            _num(r["idle_listed"], "{:.0f}"), _num(r["round_s_mean"], "{:.2f}"), _num(r["round_cpu_s_mean"], "{:.2f}"),
            str(r["sweeps"]), _num(r["peak_rss_mib"], "{:.0f}"), _num(r["rss_growth_mib"], "{:.0f}")]) + " |")
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=_ints, default=[3, 10, 25, 50])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--params", type=int, default=1_000_000,
                    help="parameters of the nnU-Net-shaped model (0: factory's three-tensor model)")
    ap.add_argument("--storage", choices=["local", "s3"], default="local")
    ap.add_argument("--json", type=Path, help="write the rows there")
    ap.add_argument("--quick", action="store_true", help="3 and 5 sites: a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.sites = [3, 5]
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    for v in variants:
        missing = set(VARIANTS[v]) - _FIELDS
        if missing:
            ap.error(f"variant {v}: this p2pfed's Settings has no {', '.join(sorted(missing))}")
    if any(VARIANTS[v].get("secure_aggregation") for v in variants) and min(args.sites) < MIN_SECURE:
        ap.error(f"secure aggregation needs at least {MIN_SECURE} sites")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill`: the temporary folder goes too
    counter = Counter()
    counter.install()
    server = endpoint = None
    with contextlib.ExitStack() as stack:
        if args.storage == "s3":
            import idle_requests  # benchmarks/idle_requests.py: the moto server and a fresh bucket

            server, endpoint = idle_requests.s3_server()
            stack.callback(server.kill)
            url_of = lambda: idle_requests.storage_url("s3", None, endpoint)  # noqa: E731
        else:
            url_of = lambda: None  # noqa: E731  (factory.make: a folder in the run's temporary root)
        t0 = time.perf_counter()
        rows = []
        for n in args.sites:  # every variant at N before the next N: a cut-short run compares
            for v in variants:
                started = time.perf_counter()
                row = one_run(v, n, args, counter, url_of, endpoint)
                row["wall_s"] = round(time.perf_counter() - started, 1)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "ticks"}), file=sys.stderr,
                      flush=True)  # progress
        total = time.perf_counter() - t0
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
               "processor": platform.processor() or platform.machine()}
    rows.sort(key=lambda r: (variants.index(r["variant"]), r["sites"]))
    print(table(rows))
    print(f"\ntotal wall {total:.0f} s; {args.storage} storage; model {args.params} parameters; {args.rounds} rounds. "
          "up/down: payload bytes per site per round (rounds and final; setup apart); further rounds: without "
          "what a site reads once (the initial model, the final metrics); M: one contribution as stored "
          "(masked: 8 bytes a parameter; plain: 4); req: storage requests per "
          "tick; round s / CPU s: wall / CPU time inside ticks from a round's opening until every site merged it "
          "(all N sites' ticks, one after the other); "
          f"peak RSS: the last site's ticks, each in a fresh process")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "total_s": round(total), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
