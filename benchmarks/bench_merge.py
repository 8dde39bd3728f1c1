"""Benchmark of the streaming merge on real nnU-Net network sizes; prints JSON.

For each network (nnU-Net's default 3d_fullres PlainConvUNet, 31 M parameters, and
ResEnc-M, 102 M) and each number of sites N, every site's weights are sharded and
sealed (encrypted for the merging site, signed by their author) into files. Then,
each in a fresh process so that its peak RSS is its own:

- stream: p2pfed.shards.stream_merge reading, decrypting and merging the N sites'
  shards (every merged shard serialized and hashed, as a node does before it
  announces the merge);
- floor:  one pass that reads, decrypts and accumulates the same bytes (float64
  multiply and add per element) and nothing else;
- naive:  read and decrypt everything into whole state dicts, then
  torch.stack([...]).mean(0) for every key, as FedAvg code usually does.

All sites share one architecture (FFE), so every layer is averaged over N sites.
Usage: python benchmarks/bench_merge.py [--sites 3 10 20] [--models plainconv resenc_m]
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from p2pfed import crypto  # noqa: E402
from p2pfed.shards import DEFAULT_MAX_BYTES, from_shards, stream_merge, to_shards  # noqa: E402

FEDERATION = {"federation": "bench", "kind": "weights", "round": 1}
READER = "s00"


# --------------------------------------------------------------------------- networks
def network(model: str):
    """nnU-Net's default 3d_fullres network of each kind (6 stages, 32..320 features)."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
    from torch import nn

    common = dict(input_channels=1, n_stages=6, features_per_stage=[32, 64, 128, 256, 320, 320],
                  conv_op=nn.Conv3d, kernel_sizes=[[3, 3, 3]] * 6, strides=[[1, 1, 1]] + [[2, 2, 2]] * 5,
                  num_classes=2, conv_bias=True, norm_op=nn.InstanceNorm3d,
                  norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                  nonlin_kwargs={"inplace": True}, deep_supervision=True)
    if model == "plainconv":
        return PlainConvUNet(n_conv_per_stage=[2] * 6, n_conv_per_stage_decoder=[2] * 5, **common)
    return ResidualEncoderUNet(n_blocks_per_stage=[1, 3, 4, 6, 6, 6], n_conv_per_stage_decoder=[1] * 5, **common)


def random_state_dict(template, seed: int) -> dict[str, np.ndarray]:
    """numpy arrays with the template's names, shapes and aliasing, random values."""
    rng, by_storage, out = np.random.default_rng(seed), {}, {}
    for name, t in template.items():
        key = (t.data_ptr(), tuple(t.shape))
        if key not in by_storage:
            by_storage[key] = rng.standard_normal(tuple(t.shape), dtype=np.float32)
        out[name] = by_storage[key]
    return out


# --------------------------------------------------------------------------- preparation
def prepare(workdir: Path, models: list[str], n_sites: int, max_bytes: int) -> dict:
    """Seal every site's shards into workdir/<model>/<site>/<i>; return model facts."""
    idents = {f"s{i:02d}": crypto.Identity.generate(f"s{i:02d}") for i in range(n_sites)}
    signing, encryption = idents[READER].private_pems()
    keys = {"reader": [base64.b64encode(signing).decode(), base64.b64encode(encryption).decode()],
            "authors": {s: ident.public().to_json() for s, ident in idents.items()}}
    (workdir / "keys.json").write_text(json.dumps(keys))
    reader_pub = {READER: idents[READER].public()}
    facts = {}
    for model in models:
        template = network(model).state_dict()
        params = sum(t.numel() for t in {t.data_ptr(): t for t in template.values()}.values())
        for i, (site, ident) in enumerate(sorted(idents.items())):
            folder = workdir / model / site
            folder.mkdir(parents=True)
            for index, blob in enumerate(to_shards(random_state_dict(template, i), max_bytes=max_bytes)):
                header = dict(FEDERATION, name=f"{site}/{index}")
                sealed = crypto.seal(blob, header=header, author=ident, recipients=reader_pub)
                (folder / str(index)).write_bytes(sealed)
        facts[model] = {"parameters": params, "keys": len(template),
                        "shards_per_site": len(list((workdir / model / READER).iterdir()))}
    return facts


# --------------------------------------------------------------------------- measured children
def child(mode: str, workdir: Path, model: str, n_sites: int) -> dict:
    keys = json.loads((workdir / "keys.json").read_text())
    reader = crypto.Identity.from_pems(READER, *(base64.b64decode(k) for k in keys["reader"]))
    authors = {s: crypto.PublicIdentity.from_json(v) for s, v in keys["authors"].items()}
    sites = [f"s{i:02d}" for i in range(n_sites)]
    counts = {s: len(list((workdir / model / s).iterdir())) for s in sites}
    weights = {s: 10 + 3 * i for i, s in enumerate(sites)}  # case counts

    def load(site: str, index: int) -> bytes:
        name = f"{site}/{index}"
        blob = (workdir / model / site / str(index)).read_bytes()
        return crypto.open_sealed(blob, reader=reader, authors=authors, name=name,
                                  expect=dict(FEDERATION, name=name))[1]

    if mode == "naive":
        import torch  # imported before the clock and the RSS baseline, like the others
    start_rss = _rss_mib()
    start = time.perf_counter()
    if mode == "stream":
        stream_merge(load, counts, weights=weights)
    elif mode == "floor":
        floor(load, counts, weights)
    else:
        naive(load, counts, torch)
    return {"wall_s": round(time.perf_counter() - start, 2), "peak_rss_mib": round(_peak_rss_mib()),
            "rss_before_mib": round(start_rss)}


def floor(load, counts: dict[str, int], weights: dict[str, int]) -> None:
    """Read, decrypt and accumulate every shard, lockstep across sites, nothing more."""
    for index in range(max(counts.values())):
        acc = None
        for site in sorted(counts):
            blob = load(site, index)
            start = 8 + int.from_bytes(blob[:8], "little")  # skip the safetensors header
            x = np.frombuffer(blob, dtype=np.float32, offset=start)
            if acc is None:
                acc, term = np.zeros(x.shape, np.float64), np.empty(x.shape, np.float64)
            np.multiply(x, np.float64(weights[site]), out=term, dtype=np.float64)
            np.add(acc, term, out=acc)


def naive(load, counts: dict[str, int], torch) -> None:
    """Whole state dicts in memory, then torch.stack(...).mean(0) per key."""
    dicts = [{k: torch.from_numpy(v) for k, v in from_shards([load(s, i) for i in range(n)], site=s).items()}
             for s, n in sorted(counts.items())]
    {key: torch.stack([d[key] for d in dicts]).mean(0) for key in dicts[0]}


def _status_mib(field: str) -> float:
    """VmRSS / VmHWM of this process, Linux. Not getrusage's ru_maxrss: that keeps
    the peak of the parent's memory image from before exec."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _rss_mib() -> float:
    return _status_mib("VmRSS")


def _peak_rss_mib() -> float:
    return _status_mib("VmHWM")


# --------------------------------------------------------------------------- driver
def warm_page_cache(folder: Path, n_sites: int) -> None:
    """Read the files once, so that no measured run pays for the disk."""
    for i in range(n_sites):
        for path in (folder / f"s{i:02d}").iterdir():
            path.read_bytes()


def run_child(mode: str, workdir: Path, model: str, n_sites: int) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--workdir", str(workdir),
           "--models", model, "--sites", str(n_sites)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, nargs="+", default=[3, 10, 20])
    ap.add_argument("--models", nargs="+", default=["plainconv", "resenc_m"], choices=["plainconv", "resenc_m"])
    ap.add_argument("--modes", nargs="+", default=["stream", "floor", "naive"])
    ap.add_argument("--max-shard-mib", type=float, default=DEFAULT_MAX_BYTES / 2**20)
    ap.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one, removed)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.workdir, args.models[0], args.sites[0])))
        return

    workdir = Path(tempfile.mkdtemp(prefix="p2pfed-bench-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        facts = prepare(workdir, args.models, max(args.sites), int(args.max_shard_mib * 2**20))
        results = []
        for model in args.models:
            for n in args.sites:
                row = {"model": model, "sites": n, **facts[model],
                       "model_mib": round(facts[model]["parameters"] * 4 / 2**20)}
                warm_page_cache(workdir / model, n)
                row.update({mode: run_child(mode, workdir, model, n) for mode in args.modes})
                if "stream" in row and "floor" in row:
                    row["stream_over_floor"] = round(row["stream"]["wall_s"] / row["floor"]["wall_s"], 2)
                results.append(row)
                print(json.dumps(row), file=sys.stderr)  # progress
        print(json.dumps({
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
                        "processor": platform.processor() or platform.machine()},
            "max_shard_mib": args.max_shard_mib, "total_s": round(time.perf_counter() - t0),
            "results": results}, indent=1))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
