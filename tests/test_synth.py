"""emseg.synth and ``emseg synth``: determinism, blockwise == whole, plausible labels, the CLI."""

from __future__ import annotations

import cc3d
import numpy as np
import pytest
from click.testing import CliRunner

from emseg.cli import cli
from emseg.errors import ConfigError, GeometryError, OutputExistsError
from emseg.geometry import Roi, plan_blocks
from emseg.synth import SynthParams, cell_grid_shape, synth_block, synth_volume, write_synth

SHAPE = (40, 48, 56)
PARAMS = SynthParams(cell_size=160.0)  # ~20-voxel cells at 8 nm, so a small volume holds many


def assemble(shape, block_shape, *, seed, params):
    raw = np.zeros(shape, np.uint8)
    labels = np.zeros(shape, np.uint64)
    for block in plan_blocks(Roi.from_shape(shape), block_shape):
        part = synth_block(block.write_roi, shape=shape, seed=seed, params=params)
        raw[block.write_roi.to_slices()] = part.raw
        labels[block.write_roi.to_slices()] = part.labels
    return raw, labels


@pytest.fixture(scope="module")
def whole():
    return synth_volume(SHAPE, seed=3, params=PARAMS)


def test_same_seed_same_bytes_other_seed_differs(whole):
    again = synth_volume(SHAPE, seed=3, params=PARAMS)
    other = synth_volume(SHAPE, seed=4, params=PARAMS)
    assert whole.raw.tobytes() == again.raw.tobytes()
    assert whole.labels.tobytes() == again.labels.tobytes()
    assert not np.array_equal(whole.raw, other.raw)
    assert not np.array_equal(whole.labels, other.labels)


@pytest.mark.parametrize("block_shape", [(16, 16, 16), (7, 32, 9)])
@pytest.mark.parametrize("voxel_size", [(8.0, 8.0, 8.0), (40.0, 4.0, 4.0)])
def test_blockwise_equals_whole(block_shape, voxel_size):
    params = SynthParams(voxel_size=voxel_size, cell_size=160.0)
    expected = synth_volume(SHAPE, seed=11, params=params)
    raw, labels = assemble(SHAPE, block_shape, seed=11, params=params)
    np.testing.assert_array_equal(raw, expected.raw)
    np.testing.assert_array_equal(labels, expected.labels)


# many small cells with seeds anywhere in their cube: some voxels need the search beyond the 27
# neighbouring cells, so this exercises the far path of the Voronoi search
FAR = SynthParams(voxel_size=(8.0, 8.0, 8.0), cell_size=100.0, membrane_thickness=20.0, jitter=1.0)


@pytest.mark.parametrize("block_shape", [(16, 16, 16), (24, 10, 64)])
def test_blockwise_equals_whole_with_far_search(block_shape):
    shape = (32, 48, 48)
    expected = synth_volume(shape, seed=1, params=FAR)
    raw, labels = assemble(shape, block_shape, seed=1, params=FAR)
    np.testing.assert_array_equal(raw, expected.raw)
    np.testing.assert_array_equal(labels, expected.labels)


def test_cells_match_brute_force_voronoi():
    from emseg.synth import _World

    shape = (32, 48, 48)
    volume = synth_volume(shape, seed=1, params=FAR)
    world = _World(shape, 1, FAR)
    table = world.table((0, 0, 0), world.grid)
    seeds = table.seeds.reshape(3, -1)
    grid = np.stack(np.meshgrid(*[(np.arange(n) + 0.5) * v for n, v in zip(shape, FAR.voxel_size)], indexing="ij"))
    points = grid.reshape(3, -1)
    dist_sq = ((points[:, :, None] - seeds[:, None, :]) ** 2).sum(axis=0)  # (voxels, seeds)
    nearest = dist_sq.argmin(axis=1)
    labels = table.labels.reshape(-1)[nearest].reshape(shape)
    # only corner voxels attached to their cell by an edge or a vertex may be given to a neighbour
    assert np.mean(labels != volume.labels) < 1e-3
    # distance to the cell boundary: the nearest bisector plane
    own = seeds[:, nearest]
    gap = np.sqrt(((seeds[:, None, :] - own[:, :, None]) ** 2).sum(axis=0))
    with np.errstate(divide="ignore", invalid="ignore"):
        plane = (dist_sq - dist_sq[np.arange(len(nearest)), nearest][:, None]) / (2 * gap)
    plane[np.arange(len(nearest)), nearest] = np.inf
    boundary = plane.min(axis=1).reshape(shape)
    half = FAR.membrane_thickness / 2
    assert volume.membrane[boundary < half * (1 - FAR.membrane_variation) - 0.01].all()
    assert not volume.membrane[boundary > half * (1 + FAR.membrane_variation) + 0.01].any()


def test_block_arrays_have_documented_types(whole):
    roi = Roi((5, 6, 7), (8, 9, 10))
    part = synth_block(roi, shape=SHAPE, seed=3, params=PARAMS)
    assert part.raw.dtype == np.uint8 and part.labels.dtype == np.uint64 and part.membrane.dtype == bool
    assert part.raw.shape == part.labels.shape == part.membrane.shape == roi.shape
    np.testing.assert_array_equal(part.membrane, whole.membrane[roi.to_slices()])


def test_labels_are_dense_cells(whole):
    labels = whole.labels
    assert labels.min() >= 1
    assert labels.max() <= np.prod(cell_grid_shape(SHAPE, PARAMS))
    ids = np.unique(labels)
    assert len(ids) > 10
    # each cell is one 6-connected region (Voronoi cells are convex; corner voxels are reassigned)
    components = cc3d.connected_components(labels, connectivity=6)
    assert len(np.unique(components)) == len(ids)


def test_labels_anisotropic_cells_are_mostly_one_piece():
    params = SynthParams(voxel_size=(40.0, 4.0, 4.0), cell_size=200.0)
    labels = synth_volume((20, 64, 64), seed=2, params=params).labels
    components = cc3d.connected_components(labels, connectivity=6)
    # a thin slice of a cell sampled by 40 nm sections may sit apart from the rest: allow crumbs
    per_label = {}
    for comp, label in zip(*np.unique(np.stack([components.ravel(), labels.ravel()]), axis=1)):
        per_label.setdefault(int(label), []).append(int(comp))
    sizes = np.bincount(components.ravel())
    largest = sum(max(sizes[c] for c in comps) for comps in per_label.values())
    assert largest >= 0.99 * labels.size
    # cells are flattened in voxels: ~5 sections deep, ~50 pixels wide
    assert len(per_label) > 8


def test_membranes_are_dark_and_thin(whole):
    membrane, raw = whole.membrane, whole.raw.astype(float)
    assert 0.05 < membrane.mean() < 0.4
    assert raw[membrane].mean() < raw[~membrane].mean() - 30
    # every boundary between two cells is drawn as membrane
    boundary = whole.labels[1:] != whole.labels[:-1]
    assert membrane[1:][boundary].all() and membrane[:-1][boundary].all()


def test_organelles_and_texture_are_optional():
    plain = SynthParams(cell_size=160.0, mito_per_cell=0, vesicles_per_cell=0, texture=0, noise=0, blur_sigma=0,
                        membrane_variation=0)
    volume = synth_volume((16, 32, 32), seed=1, params=plain)
    # without texture or noise every cell interior is flat
    interior = ~volume.membrane
    for label in np.unique(volume.labels):
        values = volume.raw[interior & (volume.labels == label)]
        assert values.size == 0 or values.min() == values.max()


def test_anisotropic_voxels_change_cell_shape():
    iso = synth_volume((32, 32, 32), seed=5, params=SynthParams(cell_size=160.0)).labels
    aniso = synth_volume((32, 32, 32), seed=5, params=SynthParams(voxel_size=(20.0, 5.0, 5.0), cell_size=160.0)).labels
    # along z a 20 nm voxel crosses boundaries 4x as often as a 5 nm one along x
    def changes(labels, axis):
        return np.count_nonzero(np.diff(labels.astype(np.int64), axis=axis))

    assert changes(aniso, 0) > 2 * changes(aniso, 2)
    assert 0.5 < changes(iso, 0) / changes(iso, 2) < 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"voxel_size": (8.0, 8.0)}, "voxel_size"),
        ({"voxel_size": (8.0, 0.0, 8.0)}, "voxel_size"),
        ({"cell_size": -1.0}, "cell_size must be positive"),
        ({"noise": -0.1}, "noise must be non-negative"),
        ({"jitter": 1.5}, "jitter"),
        ({"cell_size": 40.0}, "too small for membranes"),
    ],
)
def test_bad_params_raise(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SynthParams(**kwargs)


def test_bad_region_shape_or_seed_raise():
    with pytest.raises(GeometryError, match="not inside the volume"):
        synth_block(Roi((0, 0, 0), (9, 8, 8)), shape=(8, 8, 8), seed=0)
    with pytest.raises(GeometryError, match="3 positive ints"):
        synth_volume((8, 8), seed=0)
    with pytest.raises(ConfigError, match="non-negative int"):
        synth_volume((8, 8, 8), seed=-1)


def test_write_synth_round_trip(tmp_path):
    from emseg.io import open_volume

    dst = tmp_path / "synth.zarr"
    write_synth(dst, shape=(24, 40, 40), seed=9, params=PARAMS, chunks=(8, 16, 16), block_shape=(16, 16, 32),
                progress=False)
    expected = synth_volume((24, 40, 40), seed=9, params=PARAMS)
    raw = open_volume(dst)
    labels = open_volume(dst / "labels" / "ground_truth")
    assert raw.dtype == np.uint8 and labels.dtype == np.uint64
    assert raw.voxel_size == PARAMS.voxel_size and raw.chunks == (8, 16, 16)
    np.testing.assert_array_equal(raw.read(raw.roi), expected.raw)
    np.testing.assert_array_equal(labels.read(labels.roi), expected.labels)
    with pytest.raises(OutputExistsError, match="already exists"):
        write_synth(dst, shape=(8, 8, 8), seed=9, progress=False)
    with pytest.raises(GeometryError, match="not a multiple"):
        write_synth(tmp_path / "other.zarr", shape=(24, 40, 40), seed=9, chunks=16, block_shape=24, progress=False)


def test_cli_help():
    result = CliRunner().invoke(cli, ["synth", "--help"])
    assert result.exit_code == 0
    assert "--shape" in result.output and "--voxel-size" in result.output


def test_cli_writes_and_refuses_existing(tmp_path):
    from emseg.io import open_volume

    dst = str(tmp_path / "s.zarr")
    args = ["synth", dst, "--shape", "16,32,32", "--seed", "2", "--voxel-size", "40,4,4", "--chunks", "8,16,16",
            "--cell-size", "200", "--no-progress"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert result.output.count("\n") == 1 and "16x32x32" in result.output
    assert open_volume(dst).voxel_size == (40.0, 4.0, 4.0)

    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 1
    assert again.output.startswith("Error: ") and again.output.count("\n") == 1 and "--overwrite" in again.output

    replaced = CliRunner().invoke(cli, [*args, "--overwrite", "--seed", "3"])
    assert replaced.exit_code == 0, replaced.output


def test_cli_usage_errors(tmp_path):
    bad_vector = CliRunner().invoke(cli, ["synth", str(tmp_path / "a.zarr"), "--shape", "16,32"])
    assert bad_vector.exit_code == 2 and "Z,Y,X" in bad_vector.output
    bad_params = CliRunner().invoke(cli, ["synth", str(tmp_path / "b.zarr"), "--shape", "8", "--cell-size", "10"])
    assert bad_params.exit_code == 1 and "too small for membranes" in bad_params.output


@pytest.mark.slow
def test_cli_256_cubed_is_deterministic(tmp_path):
    from emseg.io import open_volume

    outputs = []
    for name in ("a.zarr", "b.zarr"):
        dst = str(tmp_path / name)
        result = CliRunner().invoke(cli, ["synth", dst, "--shape", "256,256,256", "--seed", "1", "--no-progress"])
        assert result.exit_code == 0, result.output
        outputs.append((open_volume(dst), open_volume(f"{dst}/labels/ground_truth")))
    (raw_a, lab_a), _ = outputs
    assert raw_a.shape == (256, 256, 256) and lab_a.dtype == np.uint64
    assert len(np.unique(lab_a.read(Roi((0, 0, 0), (64, 256, 256))))) > 50
    # identical bytes on disk, file by file (chunks and metadata)
    files_a = sorted(p.relative_to(tmp_path / "a.zarr") for p in (tmp_path / "a.zarr").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b.zarr") for p in (tmp_path / "b.zarr").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) > 128
    for rel in files_a:
        if rel.parts[0] == "emseg_state":
            continue  # the run's completion records: they hold the chunk files' modification times
        assert (tmp_path / "a.zarr" / rel).read_bytes() == (tmp_path / "b.zarr" / rel).read_bytes(), rel
