"""The synthetic multi-site generator: deterministic, heterogeneous, readable by nnU-Net."""
import json

import numpy as np
import pytest
from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

from p2pfed.errors import DatasetError
from p2pfed.synthetic import make_federation, make_pooled, make_site, site_profile


def _read(folder, case, split="Tr"):
    """A case through nnU-Net's own reader, chosen from dataset.json as nnU-Net does."""
    dataset_json = json.loads((folder / "dataset.json").read_text())
    n = len(dataset_json["channel_names"])
    images = [str(folder / f"images{split}" / f"{case}_{c:04d}.nii.gz") for c in range(n)]
    reader = determine_reader_writer_from_dataset_json(dataset_json, images[0], verbose=False)()
    data, props = reader.read_images(images)
    seg, _ = reader.read_seg(str(folder / f"labels{split}" / f"{case}.nii.gz"))
    return data, seg, props["spacing"]


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    return make_federation(raw, 3, channels=("MRI", "CT"), seed=3), raw


def test_same_seed_same_data_other_seed_other_data(tmp_path, sites):
    (first, *_), _ = sites
    again = make_site(tmp_path / "again", 101, 0, n_train=6, channels=("MRI", "CT"), seed=3)
    other = make_site(tmp_path / "other", 101, 0, n_train=6, channels=("MRI", "CT"), seed=4)
    assert (again / "dataset.json").read_text() == (first / "dataset.json").read_text()
    for k in range(6):
        a, b = _read(first, f"sitea_{k:03d}"), _read(again, f"sitea_{k:03d}")
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(_read(first, "sitea_000")[0], _read(other, "sitea_000")[0])


def test_layout_and_nnunet_readability(sites):
    folders, _ = sites
    for folder in folders:
        dataset_json = json.loads((folder / "dataset.json").read_text())
        assert dataset_json["channel_names"] == {"0": "MRI", "1": "CT"}
        assert dataset_json["labels"] == {"background": 0, "organ": 1, "lesion": 2}
        n_train = len(list((folder / "labelsTr").glob("*.nii.gz")))
        assert n_train == dataset_json["numTraining"] == len(list((folder / "imagesTr").glob("*.nii.gz"))) / 2
        assert len(list((folder / "labelsTs").glob("*.nii.gz"))) == 2
        data, seg, spacing = _read(folder, f"{folder.name.split('_')[1].lower()}_000", "Ts")
        assert data.shape[0] == 2 and data.shape[1] == 1 and seg.shape == (1,) + data.shape[1:]
        assert spacing[0] == 999.0 and set(np.unique(seg)) == {0, 1, 2}


def test_sites_are_heterogeneous(sites):
    folders, _ = sites
    cases = [_read(f, f"{f.name.split('_')[1].lower()}_000") for f in folders]
    spacings = [tuple(np.round(c[2], 3)) for c in cases]
    shapes = [c[0].shape[1:] for c in cases]
    ct_means = [c[0][1][c[1][0] > 0].mean() for c in cases]
    mri_means = [c[0][0][c[1][0] > 0].mean() for c in cases]
    counts = [json.loads((f / "dataset.json").read_text())["numTraining"] for f in folders]
    assert len(set(spacings)) == len(set(shapes)) == len(set(counts)) == 3
    assert max(ct_means) - min(ct_means) > 50  # HU
    assert max(mri_means) / min(mri_means) > 10  # arbitrary scale
    # the field of view (zero padding nnU-Net crops away) differs too
    assert len({round(float((c[0][1] == 0).mean()), 2) for c in cases}) == 3


def test_3d_variant_is_small_and_anisotropic(tmp_path):
    folder = make_site(tmp_path, 5, 2, n_train=1, n_test=0, dim=3)
    data, seg, spacing = _read(folder, "sitec_000")
    assert data.shape[1:] == site_profile(2, dim=3).shape and data.shape[1] > 1
    assert spacing[0] > 3 * spacing[1] and np.prod(data.shape) < 40 ** 3


def test_pooled_union(sites, tmp_path):
    folders, raw = sites
    pooled = make_pooled(folders, raw, 199)
    dataset_json = json.loads((pooled / "dataset.json").read_text())
    assert dataset_json["numTraining"] == 6 + 10 + 4 == len(list((pooled / "labelsTr").glob("*.nii.gz")))
    assert len(list((pooled / "imagesTs").glob("*.nii.gz"))) == 3 * 2 * 2
    assert np.array_equal(_read(pooled, "siteb_003")[0], _read(folders[1], "siteb_003")[0])
    ct_only = make_site(tmp_path, 104, 3, n_train=1, channels=("CT",))
    with pytest.raises(DatasetError, match="channel_names"):
        make_pooled([folders[0], ct_only], tmp_path, 198)


# --- the hard task (benchmarks/quality.py's study) --------------------------------------------

@pytest.fixture(scope="module")
def hard(tmp_path_factory):
    raw = tmp_path_factory.mktemp("hard")
    return [make_site(raw, 101 + i, i, n_train=12, n_test=0, task="hard", seed=1) for i in range(4)]


def _cases(folder):
    prefix = folder.name.split("_")[1].lower()
    return [_read(folder, f"{prefix}_{k:03d}") for k in range(12)]


def test_hard_task_structures_vary_from_case_to_case(hard):
    for folder in hard:
        organs = [seg[0] > 0 for _, seg, _ in _cases(folder)]
        areas = np.array([o.sum() for o in organs])
        assert areas.std() / areas.mean() > 0.15, folder.name  # organ size varies per case
        overlaps = [(a & b).sum() / (a | b).sum() for i, a in enumerate(organs) for b in organs[i + 1:]]
        assert np.median(overlaps) < 0.8, folder.name  # and its shape and position


def test_hard_task_sites_see_different_lesion_kinds_and_a_distractor(hard):
    """Each of the first three sites sees one kind of lesion more than the others: bright
    ones at SiteA, dark ones (below the organ's intensity) at SiteB; a structure as bright
    as the organ but labelled background lies beside it in many cases."""
    dark_fraction, distractors = [], 0
    for folder in hard[:3]:
        dark = total = 0
        for data, seg, _ in _cases(folder):
            ct, label = data[0], seg[0]
            organ_level = np.median(ct[label == 1])
            dark += int((ct[label == 2] < organ_level).sum())
            total += int((label == 2).sum())
            tissue = np.median(ct[(label == 0) & (ct > -500)])
            distractors += int(((label == 0) & (ct > (organ_level + tissue) / 2)).sum() > 10)
        dark_fraction.append(dark / total)
    assert dark_fraction[0] < 0.35 < 0.6 < dark_fraction[1], dark_fraction
    assert distractors >= 10  # of 36 cases


def test_hard_task_more_cases_extend_the_same_cases(tmp_path, hard):
    few = make_site(tmp_path, 101, 0, n_train=5, n_test=0, task="hard", seed=1)
    for k in range(5):
        a, b = _read(few, f"sitea_{k:03d}"), _read(hard[0], f"sitea_{k:03d}")
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
    folder = make_site(tmp_path / "3d", 5, 3, n_train=1, n_test=0, dim=3, task="hard", channels=("CT", "MRI"))
    data, seg, _ = _read(folder, "sited_000")
    assert data.shape[0] == 2 and data.shape[1] > 1 and set(np.unique(seg)) <= {0, 1, 2}
    with pytest.raises(ValueError, match="task"):
        site_profile(0, task="medium")
