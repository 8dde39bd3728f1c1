"""p2pfed.merge: AsymFedAvg on real dynamic_network_architectures UNets (small feature
counts), the reference rule, structural matching, rejections, and bit-identical
results across site order, thread counts and CPU code paths."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from p2pfed import merge
from p2pfed.errors import ContributionRejected
from p2pfed.merge import asym_fedavg, structural_keys
from p2pfed.shards import shard_hash, to_shards

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- networks (also used by test_shards)
def unet(kind="plain", n_stages=4, features=(4, 8, 16, 32, 32, 32), kernel0=(3, 3, 3), seed=0, prefix=""):
    """A real nnU-Net network (InstanceNorm, LeakyReLU, deep supervision), values drawn
    from numpy's RNG (bit-stable everywhere). Returns its state dict, aliases intact."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

    common = dict(input_channels=1, n_stages=n_stages, features_per_stage=list(features[:n_stages]),
                  conv_op=nn.Conv3d, kernel_sizes=[kernel0] + [(3, 3, 3)] * (n_stages - 1),
                  strides=[(1, 1, 1)] + [(2, 2, 2)] * (n_stages - 1), num_classes=3,
                  n_conv_per_stage_decoder=1, conv_bias=True, norm_op=nn.InstanceNorm3d,
                  norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                  nonlin_kwargs={"inplace": True}, deep_supervision=True)
    if kind == "plain":
        net = PlainConvUNet(n_conv_per_stage=2, **common)
    else:
        net = ResidualEncoderUNet(n_blocks_per_stage=[1, 2, 2, 2, 2, 2][:n_stages], **common)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.from_numpy(rng.standard_normal(p.shape, dtype=np.float32)))
    return {prefix + k: v for k, v in net.state_dict().items()}


def asym_federation():
    """Four sites of different depth, family and compile state."""
    return {
        "gamma": unet("plain", 4, seed=3),
        "alpha": unet("plain", 3, seed=1),
        "delta": unet("plain", 4, seed=4, prefix="_orig_mod."),
        "beta": unet("res", 3, seed=2),
    }


WEIGHTS = {"alpha": 12, "beta": 30, "gamma": 7, "delta": 51}


def merged_hashes(models, weights=WEIGHTS, layers="subset"):
    """site -> sha256 of each merged shard: the bits a site would publish."""
    return {site: [shard_hash(b) for b in to_shards(sd, max_bytes=64 << 10)]
            for site, sd in asym_fedavg(models, weights, layers).items()}


def np_dict(state_dict):
    return {k: v.numpy() for k, v in state_dict.items()}


# --------------------------------------------------------------------------- structural keys
def test_decoder_stages_are_keyed_by_resolution_level_from_the_input():
    keys = structural_keys(unet("plain", 4))
    assert keys["encoder.stages.2.0.convs.0.conv.weight"] == "encoder.stages.L2.0.convs.0.conv.weight"
    # 4 stages: decoder stage 0 works at level 2, stage 2 at full resolution
    assert keys["decoder.stages.0.convs.0.conv.weight"] == "decoder.stages.L2.convs.0.conv.weight"
    assert keys["decoder.transpconvs.2.weight"] == "decoder.transpconvs.L0.weight"
    assert keys["decoder.seg_layers.2.bias"] == "decoder.seg_layers.L0.bias"
    keys5 = structural_keys(unet("plain", 5))
    assert keys5["decoder.seg_layers.3.bias"] == "decoder.seg_layers.L0.bias"


def test_wrapper_prefixes_are_stripped_and_unknown_architectures_keep_plain_names():
    assert merge.strip_prefixes("module._orig_mod.encoder.stem.x") == "encoder.stem.x"
    keys = structural_keys(unet("res", 3, prefix="_orig_mod."))
    assert keys["_orig_mod.encoder.stem.convs.0.conv.weight"] == "encoder.stem.convs.0.conv.weight"
    assert keys["_orig_mod.decoder.stages.1.convs.0.conv.weight"] == "decoder.stages.L0.convs.0.conv.weight"
    # a decoder without its encoder is not a known UNet: no level renaming
    assert structural_keys(["module.decoder.stages.0.w", "head.w"]) == {
        "module.decoder.stages.0.w": "decoder.stages.0.w", "head.w": "head.w"}


# --------------------------------------------------------------------------- the merge rule
def reference_asym_fedavg(models):
    """FednnU-Net's rule: unweighted torch.mean over every key whose name and shape
    match in all sites; other keys stay local."""
    sites = list(models)
    out = {s: dict(models[s]) for s in sites}
    for key in models[sites[0]]:
        values = [models[s].get(key) for s in sites]
        if all(v is not None and v.shape == values[0].shape for v in values):
            mean = torch.stack([torch.as_tensor(v) for v in values]).mean(0)
            for s in sites:
                out[s][key] = mean
    return out


def test_intersection_with_uniform_weights_reproduces_the_reference_rule():
    # same depth, different widths: raw names and structural keys pair the same layers
    models = {"a": unet("plain", 4, features=(4, 8, 16, 32), seed=1),
              "b": unet("plain", 4, features=(4, 8, 16, 32), seed=2),
              "c": unet("plain", 4, features=(4, 8, 16, 24), seed=3)}
    ours = asym_fedavg(models, None, "intersection")
    ref = reference_asym_fedavg(models)
    averaged = 0
    for site in models:
        assert list(ours[site]) == list(models[site])
        for key, value in ref[site].items():
            if value is models[site][key]:
                assert np.array_equal(ours[site][key], value.numpy()), key  # kept local, bit for bit
            else:
                averaged += 1
                # torch.mean rounds in float32, we once from float64: a few ulp apart
                np.testing.assert_allclose(ours[site][key], value.numpy(), rtol=1e-6, atol=1e-6)
    assert averaged > 0 and averaged < sum(len(m) for m in models.values())


def test_weights_are_case_counts_and_subset_averages_over_the_sites_that_share_a_layer():
    models = {"a": {"x": np.array([1.0, 2.0], np.float32), "only_ab": np.array([4.0], np.float32)},
              "b": {"x": np.array([3.0, 6.0], np.float32), "only_ab": np.array([8.0], np.float32)},
              "c": {"x": np.array([5.0, 10.0], np.float32)}}
    w = {"a": 1, "b": 2, "c": 5}
    sub = asym_fedavg(models, w, "subset")
    assert sub["a"]["x"].tolist() == sub["c"]["x"].tolist() == [(1 + 6 + 25) / 8, (2 + 12 + 50) / 8]
    assert sub["a"]["only_ab"].tolist() == sub["b"]["only_ab"].tolist() == [np.float32(20 / 3)]
    inter = asym_fedavg(models, w, "intersection")
    assert inter["a"]["x"].tolist() == sub["a"]["x"].tolist()
    assert inter["a"]["only_ab"].tolist() == [4.0] and inter["b"]["only_ab"].tolist() == [8.0]
    assert all(v.dtype == np.float32 for sd in sub.values() for v in sd.values())


def test_ffe_identical_architectures_give_every_site_the_same_dict():
    models = {f"s{i}": unet("plain", 3, seed=i) for i in range(3)}
    out = asym_fedavg(models, {"s0": 3, "s1": 1, "s2": 9})
    assert out["s0"].keys() == out["s2"].keys() == models["s0"].keys()
    assert all(np.array_equal(out["s0"][k], out["s2"][k]) for k in out["s0"])
    expect = (3 * models["s0"]["decoder.seg_layers.0.bias"].double() + models["s1"]["decoder.seg_layers.0.bias"]
              + 9 * models["s2"]["decoder.seg_layers.0.bias"].double()) / 13
    assert np.array_equal(out["s1"]["decoder.seg_layers.0.bias"], expect.float().numpy())


def test_networks_of_different_depth_average_only_layers_at_the_same_resolution():
    # equal widths everywhere, so every decoder stage has the same shape: matching by
    # name would pair decoder.stages.0 of both (levels 2 and 3); we pair by level
    flat = (8, 8, 8, 8, 8)
    a, b = unet("plain", 4, features=flat, seed=1), unet("plain", 5, features=flat, seed=2)
    out = asym_fedavg({"a": a, "b": b})

    def mean(x, y):
        return ((x.double() + y.double()) / 2).float().numpy()

    for part in ("stages.{}.convs.0.conv.weight", "transpconvs.{}.weight", "seg_layers.{}.bias"):
        for ia in range(3):  # a's decoder index ia is level 2 - ia, b's index for that level is ia + 1
            ka, kb = "decoder." + part.format(ia), "decoder." + part.format(ia + 1)
            assert np.array_equal(out["a"][ka], mean(a[ka], b[kb])), ka
            assert np.array_equal(out["b"][kb], out["a"][ka])
        top = "decoder." + part.format(0)  # b's level 3 exists only in b
        assert np.array_equal(out["b"][top], b[top].numpy())
    assert np.array_equal(out["b"]["encoder.stages.4.0.convs.0.conv.weight"],
                          b["encoder.stages.4.0.convs.0.conv.weight"].numpy())
    key = "encoder.stages.3.0.convs.1.conv.weight"
    assert np.array_equal(out["a"][key], mean(a[key], b[key]))


def test_different_patch_sizes_keep_layers_whose_shapes_differ_local():
    # an anisotropic patch gives nnU-Net a (1, 3, 3) first kernel
    iso, aniso = unet("plain", 3, seed=1), unet("plain", 3, kernel0=(1, 3, 3), seed=2)
    out = asym_fedavg({"iso": iso, "aniso": aniso})
    first = "encoder.stages.0.0.convs.0.conv.weight"
    assert np.array_equal(out["iso"][first], iso[first].numpy())
    assert np.array_equal(out["aniso"][first], aniso[first].numpy())
    second = "encoder.stages.1.0.convs.0.conv.weight"
    assert np.array_equal(out["iso"][second], out["aniso"][second])
    assert not np.array_equal(out["iso"][second], iso[second].numpy())


def test_orig_mod_and_module_prefixes_match_plain_keys_and_are_kept_in_the_output():
    plain, compiled = unet("res", 3, seed=1), unet("res", 3, seed=2, prefix="_orig_mod.")
    ddp = unet("res", 3, seed=3, prefix="module.")
    out = asym_fedavg({"cpu": plain, "gpu": compiled, "ddp": ddp})
    assert list(out["gpu"]) == list(compiled)
    for key in plain:
        assert np.array_equal(out["cpu"][key], out["gpu"]["_orig_mod." + key]), key
        assert np.array_equal(out["cpu"][key], out["ddp"]["module." + key]), key
        assert not np.array_equal(out["cpu"][key], plain[key].numpy()), key


def test_aliased_storages_are_averaged_once_and_stay_aliased(monkeypatch):
    models = {"a": unet("plain", 3, seed=1), "b": unet("plain", 3, seed=2)}
    calls = []
    real = merge.weighted_mean
    monkeypatch.setattr(merge, "weighted_mean", lambda xs, ws: calls.append(1) or real(xs, ws))
    out = asym_fedavg(models)
    distinct = len({v.untyped_storage().data_ptr() for v in models["a"].values()})
    assert len(models["a"]) > 2 * distinct and len(calls) == distinct
    sd = out["a"]
    assert sd["encoder.stages.1.0.convs.0.conv.weight"] is sd["decoder.encoder.stages.1.0.convs.0.all_modules.0.weight"]


def test_results_are_read_only_copies_that_never_view_the_inputs():
    models = {"a": {"x": np.ones(3, np.float32)}, "b": {"y": np.ones(3, np.float32)}}
    out = asym_fedavg(models)
    assert not np.shares_memory(out["a"]["x"], models["a"]["x"])
    with pytest.raises(ValueError):
        out["a"]["x"][0] = 2.0


# --------------------------------------------------------------------------- rejected inputs
@pytest.mark.parametrize("value, why", [
    (np.array([1.0, np.nan], np.float32), "non-finite"),
    (np.array([1.0, np.inf], np.float32), "non-finite"),
    (np.array([1.0, 2.0], np.float64), "float64"),
    (torch.ones(2, dtype=torch.bfloat16), "bfloat16"),
    ([1.0, 2.0], "not an array"),
])
def test_bad_tensors_are_rejected_naming_site_and_tensor(value, why):
    models = {"good": {"enc.w": np.ones(2, np.float32)}, "bad": {"enc.w": value}}
    with pytest.raises(ContributionRejected, match=rf"site 'bad': tensor 'enc.w' .*{why}"):
        asym_fedavg(models)


@pytest.mark.parametrize("weight", [0, -1, float("nan"), float("inf"), "3", True])
def test_bad_weights_are_rejected_naming_the_site(weight):
    models = {"a": {"w": np.ones(2, np.float32)}, "b": {"w": np.ones(2, np.float32)}}
    with pytest.raises(ContributionRejected, match="site 'b': weight"):
        asym_fedavg(models, {"a": 1, "b": weight})


def test_weights_for_other_sites_and_unknown_modes_are_usage_errors():
    models = {"a": {"w": np.ones(2, np.float32)}}
    with pytest.raises(ValueError, match="weights are given"):
        asym_fedavg(models, {"b": 1})
    with pytest.raises(ValueError, match="layers must be"):
        asym_fedavg(models, layers="union")


def test_two_names_for_one_layer_are_rejected():
    sd = {"_orig_mod.w": np.ones(2, np.float32), "w": np.zeros(2, np.float32)}
    with pytest.raises(ContributionRejected, match="site 'a': tensors .* are the same layer 'w'"):
        asym_fedavg({"a": sd})


# --------------------------------------------------------------------------- determinism
def test_shuffled_site_and_key_order_give_identical_bits():
    models = asym_federation()
    expected = merged_hashes(models)
    rng = random.Random(7)
    for _ in range(3):
        sites = list(models)
        rng.shuffle(sites)
        shuffled = {}
        for site in sites:
            keys = list(models[site])
            rng.shuffle(keys)
            shuffled[site] = {k: models[site][k] for k in keys}
        assert merged_hashes(shuffled) == expected
    assert merged_hashes({s: np_dict(sd) for s, sd in models.items()}) == expected  # numpy in, same bits


CHILD = """
import json, sys, torch
sys.path.insert(0, {tests!r})
import test_merge as t
runs = []
for threads in (1, 2):  # torch and OpenMP read the thread count at each op
    torch.set_num_threads(threads)
    runs.append(t.merged_hashes(t.asym_federation()))
print(json.dumps([torch.backends.cpu.get_cpu_capability(), runs]))
"""

CONFIGS = [  # (ATEN_CPU_CAPABILITY, NPY_DISABLE_CPU_FEATURES); each child runs 1 and 2 threads
    ("default", ""),
    ("avx2", ""),
    ("avx2", "X86_V3 X86_V4 AVX512_ICL AVX512_SPR"),  # numpy's baseline (SSE) loops
]


def test_identical_bits_across_threads_and_cpu_code_paths():
    procs = []
    for aten, npy in CONFIGS:
        env = dict(os.environ, ATEN_CPU_CAPABILITY=aten, NPY_DISABLE_CPU_FEATURES=npy)
        code = CHILD.format(tests=str(ROOT / "tests"))
        procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out.splitlines()[-1]))
    assert [cap for cap, _ in results] == ["DEFAULT", "AVX2", "AVX2"]
    here = merged_hashes(asym_federation())
    assert all(run == here for _, runs in results for run in runs)
