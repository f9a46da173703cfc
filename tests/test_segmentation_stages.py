"""The segmentation stages and the `twin segment` / `twin train` commands on synthetic files."""

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from _segmentation_data import core_shell_slices, disk_slices
from phantoms.phases import Phase
from pipeline.segmentation import configure_tensorflow
from twin.io import write_netcdf
from twin.runner import StageContext
from twin.scenario import load_scenario

configure_tensorflow(threads=1)

SCANS = ("T0", "T1", "T2", "T3")
# the smallest network (tracing the training graph dominates the time of these tests)
SMALL = ["segmentation.tile_shape_px=[32,32]", "segmentation.depth=1", "segmentation.base_filters=4",
         "segmentation.epochs=1", "segmentation.n_training_slices=3", "segmentation.random_forest_n_estimators=5",
         "segmentation.validation_split=0",
         # the synthetic scans are independent 2D disk slices stacked along z: only (y, x) slices make sense
         'segmentation.slice_planes=["yx"]']


def _write_scan(root: Path, scan: str, rng, *, lithiated_shells: bool = False) -> tuple[Path, Path]:
    """A (6, 32, 40) volume of disks (with lithiated shells: crystalline cores in Li_xSi shells) with a copper slab
    at z = 0, and its phantom truth."""
    if lithiated_shells:
        images, labels = core_shell_slices(6, 32, 40, rng, n_disks=4, radius_px=(5, 9))
        masks = labels > 0
        phase = np.choose(labels, [Phase.ELECTROLYTE, Phase.SI_CRYSTALLINE, Phase.SI_LITHIATED]).astype(np.uint8)
    else:
        images, masks = disk_slices(6, 32, 40, rng, n_disks=4, radius_px=(4, 8))
        phase = np.where(masks, Phase.SI_CRYSTALLINE, Phase.ELECTROLYTE).astype(np.uint8)
    phase[0] = Phase.COPPER
    volume = images.copy()
    volume[0] = 1.0 + rng.normal(0, 0.1, volume[0].shape)
    particle = masks.astype(np.int32)
    coords = {d: np.arange(n) * 0.4 for d, n in zip("zyx", volume.shape)}
    rec, tru = root / "reconstruction" / scan, root / "truth" / scan
    write_netcdf(xr.Dataset({"volume": (("z", "y", "x"), volume.astype(np.float32))}, coords=coords,
                            attrs={"voxel_size_um": 0.4}), rec / "volume.nc")
    write_netcdf(xr.Dataset({"phase": (("z", "y", "x"), phase), "particle": (("z", "y", "x"), particle)},
                            coords=coords, attrs={"voxel_size_um": 0.4}), tru / "phantom.nc")
    return rec, tru


@pytest.mark.slow
def test_training_and_segmentation_stages_write_the_contract_files(tmp_path):
    from pipeline.segmentation import compute_segmentation, compute_segmentation_training
    from validation.segmentation_scores import score_files

    rng = np.random.default_rng(0)
    inputs = {}
    for scan in SCANS:
        rec, tru = _write_scan(tmp_path / "in", scan, rng)
        inputs[("reconstruction", scan)], inputs[("truth", scan)] = rec, tru
    sc = load_scenario("tiny", SMALL)
    train_dir = tmp_path / "training"
    train_dir.mkdir()
    compute_segmentation_training(StageContext("segmentation_training", None, sc, train_dir, inputs, 1, "k"))
    report = json.loads((train_dir / "training.json").read_text())
    assert report["models"]["model_1"]["scans"] == ["T0", "T1", "T2"]
    assert report["models"]["model_2"]["scans"] == ["T3"]
    assert len(report["models"]["model_1"]["slices"]) == 3  # one per scan, round robin
    assert report["device"] == "CPU"
    for k in (1, 2):
        assert (train_dir / f"model_{k}.keras").stat().st_size > 0
    seg_dir = tmp_path / "segmentation"
    seg_dir.mkdir()
    seg_inputs = {("reconstruction", "T3"): inputs[("reconstruction", "T3")], ("segmentation_training", None): train_dir}
    compute_segmentation(StageContext("segmentation", "T3", sc, seg_dir, seg_inputs, 1, "k"))
    with xr.open_dataset(seg_dir / "labels.nc", engine="h5netcdf") as ds:
        assert ds["labels"].dtype == np.uint8 and ds["labels"].shape == (6, 32, 40)
        assert {"labels_otsu", "labels_random_forest"} <= set(ds.data_vars)
        assert ds.attrs["voxel_size_um"] == 0.4 and ds.attrs["model"] == "model_2.keras"
    import tifffile

    assert tifffile.imread(seg_dir / "labels.tif").shape == (6, 32, 40)
    scores = score_files(seg_dir / "labels.nc", inputs[("truth", "T3")] / "phantom.nc", scan="T3")
    assert {"segmentation.dice_si.T3", "segmentation.dice_si_otsu.T3", "segmentation.boundary_f1_random_forest.T3",
            "segmentation.particle_detection_rate.T3"} <= set(scores)
    # the random forest sees the copper slab in training and keeps it out of the Si class
    assert scores["segmentation.dice_si_random_forest.T3"] > 0.8


@pytest.mark.slow
def test_three_class_stages_label_lithiated_si_and_score_it(tmp_path):
    from pipeline.segmentation import compute_segmentation, compute_segmentation_training
    from validation.segmentation_scores import LITHIATION_METRICS, score_files

    rng = np.random.default_rng(1)
    inputs = {}
    for scan in SCANS:
        rec, tru = _write_scan(tmp_path / "in", scan, rng, lithiated_shells=True)
        inputs[("reconstruction", scan)], inputs[("truth", scan)] = rec, tru
    sc = load_scenario("tiny", [*SMALL, "segmentation.n_classes=3"])
    train_dir, seg_dir = tmp_path / "training", tmp_path / "segmentation"
    train_dir.mkdir(), seg_dir.mkdir()
    compute_segmentation_training(StageContext("segmentation_training", None, sc, train_dir, inputs, 1, "k"))
    with xr.open_dataset(train_dir / "training_slices.nc", engine="h5netcdf") as ds:
        assert set(np.unique(ds["annotation"].values)) == {0, 1, 2}  # the truth's Li_xSi is annotated 2
    seg_inputs = {("reconstruction", "T3"): inputs[("reconstruction", "T3")], ("segmentation_training", None): train_dir}
    compute_segmentation(StageContext("segmentation", "T3", sc, seg_dir, seg_inputs, 1, "k"))
    with xr.open_dataset(seg_dir / "labels.nc", engine="h5netcdf") as ds:
        assert ds.attrs["n_classes"] == 3 and list(ds["labels"].attrs["flag_values"]) == [0, 1, 2]
        assert set(np.unique(ds["labels_random_forest"].values)) == {0, 1, 2}
    scores = score_files(seg_dir / "labels.nc", inputs[("truth", "T3")] / "phantom.nc", scan="T3")
    for suffix in ("", "_otsu", "_random_forest"):
        assert {f"segmentation.{m}{suffix}.T3" for m in LITHIATION_METRICS} <= set(scores)
    # three grey levels 0.3 apart under noise 0.05: the forest finds both Si classes (measured 0.989-0.999, seeds 1-3)
    assert scores["segmentation.dice_lithiated_si_random_forest.T3"] > 0.95
    assert scores["segmentation.dice_si_without_lithium_random_forest.T3"] > 0.95
    # the oracle writes the true three-class labels, which score perfectly
    oracle = load_scenario("tiny", [*SMALL, "segmentation.n_classes=3", "oracle.true_labels=true"])
    oracle_dir = tmp_path / "oracle"
    oracle_dir.mkdir()
    compute_segmentation(StageContext("segmentation", "T3", oracle, oracle_dir, {("truth", "T3"): inputs[("truth", "T3")]},
                                      1, "k"))
    perfect = score_files(oracle_dir / "labels.nc", inputs[("truth", "T3")] / "phantom.nc", scan="T3")
    assert perfect["segmentation.dice_lithiated_si.T3"] == 1.0 and perfect["segmentation.lithiated_share_error.T3"] == 0


@pytest.mark.slow
def test_cli_train_then_segment_and_a_truncated_model_exits_2(tmp_path, run_cli):
    import tifffile
    from typer.testing import CliRunner

    from twin.cli import app

    images, masks = disk_slices(3, 40, 72, np.random.default_rng(2))
    tifffile.imwrite(tmp_path / "slices.tif", images, photometric="minisblack")
    tifffile.imwrite(tmp_path / "labels.tif", masks * 2, photometric="minisblack")  # ilastik-style: Si exported as 2
    small = [a for s in SMALL for a in ("--set", s)]
    runner = CliRunner()
    done = runner.invoke(app, ["train", str(tmp_path / "slices.tif"), str(tmp_path / "labels.tif"), "--si-label", "2",
                               "--out", str(tmp_path / "model"), "--scenario", "tiny", *small])
    assert done.exit_code == 0, done.output
    # 40 x 72 slices in 32 x 32 tiles: 2 x 3 tiles each
    assert json.loads((tmp_path / "model" / "training.json").read_text())["n_tiles"] == 3 * 2 * 3
    volume, _ = disk_slices(2, 40, 72, np.random.default_rng(3))
    tifffile.imwrite(tmp_path / "volume.tif", volume, photometric="minisblack")
    done = runner.invoke(app, ["segment", str(tmp_path / "volume.tif"), "--model", str(tmp_path / "model" / "model.keras"),
                               "--out", str(tmp_path / "seg"), "--scenario", "tiny", *small])
    assert done.exit_code == 0, done.output
    labels = tifffile.imread(tmp_path / "seg" / "labels.tif")
    assert labels.shape == (2, 40, 72) and labels.dtype == np.uint8
    with xr.open_dataset(tmp_path / "seg" / "labels.nc", engine="h5netcdf") as ds:
        np.testing.assert_array_equal(ds["labels"].values, labels)
    # through the real entry point: a truncated model is invalid input (exit 2) naming the file
    data = (tmp_path / "model" / "model.keras").read_bytes()
    (tmp_path / "cut.keras").write_bytes(data[: len(data) // 3])
    done = run_cli("segment", str(tmp_path / "volume.tif"), "--model", str(tmp_path / "cut.keras"),
                   "--out", str(tmp_path / "seg2"), "--scenario", "tiny", *small)
    assert done.returncode == 2 and "cut.keras" in done.stderr
