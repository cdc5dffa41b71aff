"""Elastic deformation keeps raw and labels aligned; patches are reproducible from the seed."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from emseg.training import DataSource, TrainConfig, deform, elastic_field
from emseg.training.data import PreparedVolume, membrane_from_instances, sample_batch


def blocky_labels(shape: tuple[int, int], cell: int, gap: int, seed: int = 0) -> np.ndarray:
    """Square cells of ``cell`` px with ``gap`` px of background (id 0) between them."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint32)
    ids = rng.permutation(10_000)[: (shape[0] // cell + 1) * (shape[1] // cell + 1)] + 1
    k = 0
    for y in range(0, shape[0], cell):
        for x in range(0, shape[1], cell):
            labels[y : y + cell - gap, x : x + cell - gap] = ids[k]
            k += 1
    return labels


def test_elastic_field_is_smooth_with_the_requested_scale() -> None:
    field = elastic_field((200, 200), np.random.default_rng(1), sigma=10, grid=3)
    assert field.shape == (2, 200, 200)
    assert 2 < field.std() < 30
    # smooth: neighbouring pixels move almost alike
    assert np.abs(np.diff(field, axis=-1)).max() < 1.0


def test_deformation_keeps_raw_and_labels_aligned() -> None:
    labels = blocky_labels((96, 96), cell=16, gap=3)
    k = 0.01
    raw = labels.astype(np.float32) * k
    field = elastic_field(labels.shape, np.random.default_rng(2), sigma=10)
    raw_d = deform(raw, field, order=1)
    labels_d = deform(labels, field, order=0)
    assert labels_d.dtype == labels.dtype
    assert not np.array_equal(labels_d, labels)  # the field really moved things
    # nearest-neighbour resampling of raw = labels * k gives exactly the deformed labels * k
    np.testing.assert_array_equal(deform(raw, field, order=0), labels_d.astype(np.float32) * k)
    # linear resampling: wherever the source point lies >= 1 px from a label change (and inside
    # the image; training reads a margin so it always is) raw is exactly label * k
    flat = ndimage.minimum_filter(labels, 3) == ndimage.maximum_filter(labels, 3)
    ys, xs = np.meshgrid(np.arange(96), np.arange(96), indexing="ij")
    inside = (ys + field[0] > 1) & (ys + field[0] < 94) & (xs + field[1] > 1) & (xs + field[1] < 94)
    check = deform(flat, field, order=0) & inside
    assert check.mean() > 0.3
    np.testing.assert_allclose(raw_d[check], labels_d[check] * k, atol=1e-4)
    # and the labels' boundaries are where the raw changes
    raw_changes = ndimage.maximum_filter(raw_d, 3) - ndimage.minimum_filter(raw_d, 3) > 1e-3
    label_changes = ndimage.maximum_filter(labels_d, 3) != ndimage.minimum_filter(labels_d, 3)
    assert (raw_changes[label_changes & inside]).all()


def _synthetic_volume() -> PreparedVolume:
    instances = np.stack([blocky_labels((128, 128), cell=20, gap=4, seed=z) for z in range(2)])
    raw = np.where(instances == 0, 250, 10).astype(np.uint8)  # dark cells, bright membranes
    return PreparedVolume(name="synthetic", raw=raw, instances=instances, weights=None, labels_kind="instances")


def _cfg(**kw: object) -> TrainConfig:
    return TrainConfig(train=[DataSource(raw="r", labels="l")], output="o", loss="bce", intensity=False, **kw)


def test_augmented_patches_keep_raw_and_membrane_target_aligned() -> None:
    vol = _synthetic_volume()
    cfg = _cfg(batch_size=4)
    batch = sample_batch([vol], cfg, (64, 64), (40, 40), step=3, rank=0, world_size=1, normalization=(0.0, 1.0))
    assert batch.raw.shape == (4, 1, 64, 64) and batch.target.shape == (4, 1, 40, 40)
    raw_center = batch.raw[:, 0, 12:52, 12:52]  # the output crop of the input window
    bright = raw_center > 0.5
    assert (bright == (batch.target[:, 0] > 0.5)).mean() > 0.97


def test_batches_are_reproducible_and_shared_out_by_rank() -> None:
    vol = _synthetic_volume()
    cfg = _cfg(batch_size=4)
    args = dict(step=7, normalization=(0.0, 1.0))
    whole = sample_batch([vol], cfg, (48, 48), (48, 48), rank=0, world_size=1, **args)
    again = sample_batch([vol], cfg, (48, 48), (48, 48), rank=0, world_size=1, **args)
    np.testing.assert_array_equal(whole.raw, again.raw)
    r0 = sample_batch([vol], cfg, (48, 48), (48, 48), rank=0, world_size=2, **args)
    r1 = sample_batch([vol], cfg, (48, 48), (48, 48), rank=1, world_size=2, **args)
    np.testing.assert_array_equal(r0.raw, whole.raw[0::2])
    np.testing.assert_array_equal(r1.raw, whole.raw[1::2])


def test_membrane_from_instances_marks_id_changes_and_background() -> None:
    inst = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [0, 0, 0, 0]], np.uint32)
    expected = np.array([[0, 1, 1, 0], [0, 1, 1, 0], [1, 1, 1, 1]], np.uint8)
    np.testing.assert_array_equal(membrane_from_instances(inst), expected)


def test_section_defects_blank_or_darken_sections() -> None:
    from emseg.training import section_defects

    raw = np.full((6, 4, 4), 0.8, np.float32)
    out = section_defects(raw, np.random.default_rng(0), prob=1.0)
    means = out.mean(axis=(1, 2))
    assert ((means == 0) | ((means >= 0.8 * 0.2 - 1e-6) & (means <= 0.8 * 0.5 + 1e-6))).all()
    np.testing.assert_array_equal(section_defects(raw, np.random.default_rng(0), prob=0.0), raw)


def test_2d_patches_of_isotropic_data_are_sections_of_every_orientation(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A ramp along z: flat in every xy section, a gradient in xz and yz sections."""
    import tifffile

    from emseg.training.data import load_source

    raw = np.broadcast_to((np.arange(24, dtype=np.uint8) * 10)[:, None, None], (24, 24, 24)).copy()
    ids = np.full(raw.shape, 5, np.uint16)
    ids[:, :, 12:] = 9  # two cells: a boundary across x, seen in xy and xz sections, not in yz ones
    ids[:, :, 20:] = 14
    tifffile.imwrite(tmp_path / "raw.tif", raw)
    tifffile.imwrite(tmp_path / "ids.tif", ids)
    source = DataSource(raw=str(tmp_path / "raw.tif"), labels=str(tmp_path / "ids.tif"))
    varying = {}
    for isotropic in (False, True):
        cfg = TrainConfig(train=(source,), output="o", intensity=False, augment=False, isotropic=isotropic,
                          voxel_size_nm=(10, 10, 10), batch_size=24)
        vol = load_source(source, cfg)
        # weighted-ce keeps one weight map per orientation, each of sections along its axis
        assert len(vol.view_weights) == (2 if isotropic else 0)
        for axis, maps in enumerate(vol.view_weights, start=1):
            assert maps.shape == raw.shape
            # the border weight between two cells: along x in xz sections; a yz section at x 5 holds one cell
            assert (np.take(maps, 5, axis=axis).max() > 2) == (axis == 1)
        batch = sample_batch([vol], cfg, (16, 16), (16, 16), step=1, rank=0, world_size=1, normalization=(0.0, 1.0))
        varying[isotropic] = [bool(np.ptp(p) > 0) for p in batch.raw[:, 0]]
    assert not any(varying[False])  # xy sections only
    assert any(varying[True]) and not all(varying[True])  # xy and the other two orientations
