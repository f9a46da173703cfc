"""The DIC stages end to end on a small synthetic series with known truth, the scores, tracking, and `twin dic`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.ndimage as ndi
import xarray as xr
from test_dic import texture, warp

from twin.runner import StageContext
from twin.scenario import load_scenario

# The module's series fixture runs three DIC pairs, the composition and the tracking once (~40 s).
pytestmark = pytest.mark.slow

SHAPE = (48, 40, 40)
N_SCANS = 4  # T0 ... T3; T2 → T3 is the double scan (no motion)


def truth_u(k: int):
    """Cumulative true displacement T0 → Tk (voxels): axial, growing quadratically with height, and a lateral drift."""
    k = min(k, 2)
    n = SHAPE[0]
    return lambda X: np.stack([k * (0.3 + 0.8 * (X[0] / n) ** 2), 0.15 * k + 0 * X[0], 0 * X[0]])


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """Reconstructions, phantoms (truth) and segmentations of T0..T3 written as the upstream stages write them."""
    root = tmp_path_factory.mktemp("series")
    rng = np.random.default_rng(5)
    f = texture(SHAPE, rng, blobs=0)
    zz, yy, xx = np.indices(SHAPE)
    si = np.zeros(SHAPE, np.float32)
    for c in ([14, 12, 12], [30, 26, 14], [24, 14, 28], [36, 28, 28]):  # four "particles" of radius 5
        si[((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) < 25] = 1
    f = f + 2.0 * si
    grid = np.indices(SHAPE).reshape(3, -1).astype(float)
    inputs = {}
    for k in range(N_SCANS):
        u = truth_u(k)
        volume = (f if k == 0 else warp(f, u)) + rng.normal(0, 0.05, SHAPE).astype(np.float32)
        labels = (si if k == 0 else warp(si, u)) > 0.5
        coords = {"z": np.arange(SHAPE[0]) * 0.2, "y": np.arange(SHAPE[1]) * 0.2, "x": np.arange(SHAPE[2]) * 0.2}
        for stage, name, ds in (
            ("reconstruction", "volume.nc", xr.Dataset({"volume": (("z", "y", "x"), volume.astype(np.float32))}, coords=coords,
                                                       attrs={"voxel_size_um": 0.2})),
            ("segmentation", "labels.nc", xr.Dataset({"labels": (("z", "y", "x"), labels.astype(np.uint8))}, coords=coords)),
            ("truth", "phantom.nc", xr.Dataset({"displacement": (("component", "z", "y", "x"),
                                                                 u(grid).reshape(3, *SHAPE).astype(np.float32))},
                                               coords={**coords, "component": ["z", "y", "x"]})),
        ):
            d = root / stage / f"T{k}"
            d.mkdir(parents=True)
            ds.to_netcdf(d / name, engine="h5netcdf")
            inputs[(stage, f"T{k}")] = d
    return root, inputs


@pytest.fixture(scope="module")
def scenario():
    return load_scenario("tiny", ["dic.node_spacing_px=[12,8]", "dic.processes=1", "dic.max_iterations=300",
                                  "dic.retry_max_iterations=[300]", "validation.voi_size_um=4.0"])


@pytest.fixture(scope="module")
def run_dirs(series, scenario):
    from pipeline.dic import compute_dic, compute_dic_composition
    from pipeline.tracking import compute_particle_labels, compute_tracking

    root, inputs = series
    inputs = dict(inputs)
    recon = {k: v for k, v in inputs.items() if k[0] == "reconstruction"}
    for k in range(1, N_SCANS):
        out = root / "dic" / f"T{k}"
        out.mkdir(parents=True)
        declared = {n: recon[n] for n in (("reconstruction", f"T{k - 1}"), ("reconstruction", f"T{k}"))}
        compute_dic(StageContext("dic", f"T{k}", scenario, out, declared, 1, "key"))
        inputs[("dic", f"T{k}")] = out
    comp = root / "dic_composition"
    comp.mkdir()
    declared = {**recon, **{k: v for k, v in inputs.items() if k[0] == "dic"}}
    compute_dic_composition(StageContext("dic_composition", None, scenario, comp, declared, 1, "key"))
    inputs[("dic_composition", None)] = comp
    for k in range(N_SCANS):
        out = root / "particle_labels" / f"T{k}"
        out.mkdir(parents=True)
        declared = {("segmentation", f"T{k}"): inputs[("segmentation", f"T{k}")]}
        compute_particle_labels(StageContext("particle_labels", f"T{k}", scenario, out, declared, 1, "key"))
        inputs[("particle_labels", f"T{k}")] = out
    track = root / "tracking"
    track.mkdir()
    declared = {k: v for k, v in inputs.items() if k[0] in ("particle_labels", "dic_composition")}
    compute_tracking(StageContext("tracking", None, scenario, track, declared, 1, "key"))
    return root, inputs


def test_dic_stage_writes_contract_files(run_dirs):
    from pipeline._dic_io import read_tsv

    root, _ = run_dirs
    d = root / "dic" / "T1"
    for name in ("phi_field.nc", "phi_field.tsv", "registration.tsv", "nodes.csv", "increment-vol-Q8.tif",
                 "increment-strain-Q8.csv", "dic.json"):
        assert (d / name).is_file(), name
    with xr.open_dataset(d / "phi_field.nc", engine="h5netcdf") as ds:
        assert ds["displacement"].dims == ("component", "z", "y", "x")
        for name in ("F", "converged", "volumetric_strain"):
            assert name in ds
    tsv = read_tsv(d / "phi_field.tsv")  # spam's own reader
    assert tsv["phi"].shape[1:] == (4, 4)


def test_composed_field_and_scores_against_truth(run_dirs):
    from validation.dic_scores import dic_metrics

    root, inputs = run_dirs
    phantoms = {f"T{k}": inputs[("truth", f"T{k}")] / "phantom.nc" for k in range(N_SCANS)}
    dic_dirs = {f"T{k}": root / "dic" / f"T{k}" for k in range(1, N_SCANS)}
    m = dic_metrics(root / "dic_composition", phantoms, dic_dirs, root / "tracking")
    assert all(math.isfinite(v) for v in m.values())
    for k in range(1, N_SCANS):
        for name in ("dic.displacement_rmse_vx", "dic.volumetric_strain_mae", "dic.volumetric_strain_bias",
                     "dic.converged_fraction"):
            assert f"{name}.T{k}" in m
        # measured 0.057 (T1), 0.096, 0.099 voxel with 9³ windows and linear interpolation: ≥1.5x margin
        assert m[f"dic.displacement_rmse_vx.T{k}"] < 0.15
        assert m[f"dic.converged_fraction.T{k}"] > 0.8  # measured 0.975-1.0
        # true volumetric strain reaches ~0.1; measured MAE 0.011 (T1), 0.018, 0.018
        assert m[f"dic.volumetric_strain_mae.T{k}"] < 0.03
    assert m["dic.noise_floor_vx"] < 0.05  # measured 0.020
    assert m["tracking.axial_displacement_rmse_um"] < 0.1  # voxel 0.2 µm; measured 0.034 µm
    assert m["tracking.tracked_fraction"] == 1.0


def test_noise_baseline_and_residuals(run_dirs):
    root, _ = run_dirs
    baseline = json.loads((root / "dic_composition" / "noise_baseline.json").read_text())
    assert baseline["double_scan"] == ["T2", "T3"]
    assert baseline["threshold"] > 0
    with xr.open_dataset(root / "dic_composition" / "residuals.nc", engine="h5netcdf") as ds:
        r = ds["residual"].astype(np.float32).values
    # after deforming T0 with the composed field the residual is noise-sized (noise σ 0.05 on each scan)
    # while the undeformed difference is texture-sized (texture σ ~1); measured 0.10
    assert np.sqrt(np.mean(r[:, 8:-8, 8:-8, 8:-8] ** 2)) < 0.2


def test_tracking_follows_particles(run_dirs):
    root, _ = run_dirs
    table = np.genfromtxt(root / "tracking" / "trajectories.csv", delimiter=",", names=True, dtype=None, encoding="utf-8")
    assert set(table["particle"].tolist()) == {1, 2, 3, 4}
    t2 = table[table["scan"] == "T2"]
    truth = np.array([truth_u(2)(np.array([[z], [0], [0]]))[0, 0] for z in t2["z0_px"]])
    np.testing.assert_allclose(t2["dz_px"], truth, atol=0.3)
    vois = np.genfromtxt(root / "tracking" / "vois.csv", delimiter=",", names=True, dtype=None, encoding="utf-8")
    assert np.all(np.isfinite(vois["volumetric_strain"]))


def test_tracking_splits_touching_particles_and_follows_each():
    """Three touching spheres (one connected component) moved by a known rigid shift: three tracks, each exact."""
    from pipeline.tracking import split_particles, track

    idx = np.indices((40, 48, 48))
    centres = [(20, 24, 12), (20, 24, 24), (20, 24, 36)]  # radius 6.5, 12 apart: each pair touches

    def spheres(shift):
        return np.any([np.linalg.norm(idx - (np.add(c, shift))[:, None, None, None], axis=0) <= 6.5 for c in centres], axis=0)

    shift = np.array([3.0, -1.0, 2.0])
    masks = {"T0": spheres((0, 0, 0)), "T1": spheres(shift)}
    assert ndi.label(masks["T0"])[1] == 1
    rows = track({k: split_particles(m) for k, m in masks.items()}, lambda scan, pts: np.tile(shift, (len(pts), 1)))
    t1 = [r for r in rows if r["scan"] == "T1"]
    assert len(t1) == 3
    np.testing.assert_allclose(sorted(r["x0_px"] for r in t1), [12, 24, 36], atol=0.5)
    for r in t1:
        np.testing.assert_allclose([r["dz_px"], r["dy_px"], r["dx_px"]], shift, atol=1e-6)
    components = {k: split_particles(m, watershed_level=0) for k, m in masks.items()}
    assert len([r for r in track(components, lambda scan, pts: np.tile(shift, (len(pts), 1)))
                if r["scan"] == "T1"]) == 1  # connected components merge them
    from pipeline.tracking import WATERSHED_LEVEL_VOX

    assert load_scenario("tiny").validation.particle_watershed_level == WATERSHED_LEVEL_VOX  # one default


def test_tracking_loses_a_particle_rather_than_matching_a_distant_one():
    """The T0 particle's voxels land inside a much larger Si body whose centre is 10 voxels away: lost, not tracked."""
    from pipeline.tracking import split_particles, track

    idx = np.indices((48, 48, 48))
    small = np.linalg.norm(idx - np.array([24, 24, 20])[:, None, None, None], axis=0) <= 6.5
    large = np.linalg.norm(idx - np.array([24, 24, 30])[:, None, None, None], axis=0) <= 14
    rows = track({"T0": split_particles(small), "T1": split_particles(large)}, lambda scan, pts: np.zeros((len(pts), 3)))
    (t1,) = [r for r in rows if r["scan"] == "T1"]
    assert np.isnan(t1["dz_px"])


def test_metrics_leave_out_all_failed_scans(tmp_path, run_dirs):
    """Non-convergence everywhere gives no metric rather than NaN."""
    from validation.dic_scores import dic_metrics

    root, inputs = run_dirs
    with xr.open_dataset(root / "dic_composition" / "cumulative.nc", engine="h5netcdf") as ds:
        bad = ds.load()
    bad["displacement"][:] = np.nan
    (tmp_path / "comp").mkdir()
    bad.to_netcdf(tmp_path / "comp" / "cumulative.nc", engine="h5netcdf")
    m = dic_metrics(tmp_path / "comp", {"T1": inputs[("truth", "T1")] / "phantom.nc"})
    assert "dic.displacement_rmse_vx.T1" not in m
    assert all(math.isfinite(v) for v in m.values())


def test_cli_dic_missing_file_exit_2(run_cli, tmp_path):
    res = run_cli("dic", str(tmp_path / "nope.nc"), str(tmp_path / "nope2.nc"), "--out", str(tmp_path / "o"))
    assert res.returncode == 2
    assert "nope.nc" in res.stderr


def test_cli_dic_on_tiffs(run_cli, tmp_path, series):
    import tifffile

    root, inputs = series
    for k in (0, 1):
        with xr.open_dataset(inputs[("reconstruction", f"T{k}")] / "volume.nc", engine="h5netcdf") as ds:
            tifffile.imwrite(tmp_path / f"T{k}.tif", ds["volume"].values)
    res = run_cli("dic", str(tmp_path / "T0.tif"), str(tmp_path / "T1.tif"), "--out", str(tmp_path / "o"),
                  "--set", "dic.node_spacing_px=[12,8]", "--set", "dic.processes=1")
    assert res.returncode == 0, res.stderr
    for name in ("phi_field.nc", "phi_field.tsv", "nodes.csv", "increment-vol-Q8.tif"):
        assert (tmp_path / "o" / name).is_file()
    assert "converged" in res.stdout


def test_particle_labels_stage_names_a_bad_segmentation_file(tmp_path):
    from pipeline.tracking import compute_particle_labels
    from twin.errors import InputFileError

    seg = tmp_path / "segmentation"
    seg.mkdir()
    xr.Dataset({"other": (("z", "y", "x"), np.zeros((4, 4, 4), np.uint8))}).to_netcdf(seg / "labels.nc", engine="h5netcdf")
    ctx = StageContext("particle_labels", "T0", load_scenario("tiny"), tmp_path, {("segmentation", "T0"): seg}, 1, "key")
    with pytest.raises(InputFileError, match=r"labels\.nc.*no variable 'labels'"):
        compute_particle_labels(ctx)
    (seg / "labels.nc").write_bytes(b"truncated")
    with pytest.raises(InputFileError, match=r"labels\.nc.*cannot read it"):
        compute_particle_labels(ctx)


def test_streamed_residuals_file_is_the_file_write_netcdf_makes(tmp_path):
    from pipeline._dic_io import residuals_file
    from twin.io import write_netcdf

    rng = np.random.default_rng(2)
    scans, shape = ["T1", "T2", "T3"], (5, 6, 7)
    residual = rng.normal(size=(3, *shape)).astype(np.float16)
    double = rng.normal(size=shape).astype(np.float16)
    mask = (rng.random(shape) > 0.5).astype(np.uint8)
    with residuals_file(tmp_path / "streamed.nc", scans, shape, first="T0", noise_threshold=0.25,
                        voxel_size_um=0.4) as variables:
        variables["texture_mask"][...] = mask
        for i in (2, 0, 1):  # in any order
            variables["residual"][i] = residual[i]
        variables["residual_double_scan"][...] = double
    zyx = ("z", "y", "x")
    expected = xr.Dataset({"residual": (("scan", *zyx), residual, {"long_name": "Ti - T0 deformed by Phi_0i"}),
                           "residual_double_scan": (zyx, double), "texture_mask": (zyx, mask)},
                          coords={"scan": scans}, attrs={"noise_threshold": 0.25, "voxel_size_um": 0.4})
    write_netcdf(expected, tmp_path / "whole.nc")
    streamed = xr.load_dataset(tmp_path / "streamed.nc", engine="h5netcdf")
    xr.testing.assert_identical(streamed, xr.load_dataset(tmp_path / "whole.nc", engine="h5netcdf"))
    xr.testing.assert_identical(streamed, expected)
    with pytest.raises(RuntimeError), residuals_file(tmp_path / "broken.nc", scans, shape, first="T0",
                                                     noise_threshold=0.25, voxel_size_um=0.4):
        raise RuntimeError("a residual failed")
    assert not (tmp_path / "broken.nc").exists()  # nothing half written is left as if valid
