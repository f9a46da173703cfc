"""The microstructure and truth stages on the ``tiny`` scenario, with a lithiation.nc written here."""

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from phantoms.deformation import load_deformation
from phantoms.phases import Phase, si_mask
from phantoms.truth import compute_microstructure, compute_truth, particle_fractions, write_phantom_png
from twin.io import write_netcdf
from twin.runner import StageContext
from twin.scenario import load_scenario

SCANS = ["T0", "T1", "T2"]


def _lithiation(path):
    depth = np.linspace(0, 20, 6)
    radius = np.linspace(0.2, 5, 5)
    front = np.exp(-depth / 10)[:, None] * np.exp(-radius / 8)[None]  # more near the separator and in small grains
    data = np.stack([0 * front, 0.45 * front, 0 * front])  # T2: delithiated
    da = xr.DataArray(data.astype(np.float32), dims=("scan", "depth_um", "radius_um"),
                      coords={"scan": SCANS, "depth_um": depth, "radius_um": radius}, name="lithiated_fraction")
    write_netcdf(da.to_dataset(), path / "lithiation.nc")
    return da


def _ctx(sc, stage, item, out, inputs):
    out.mkdir(parents=True, exist_ok=True)
    return StageContext(stage=stage, item=item, scenario=sc, out_dir=out, inputs=inputs, seed=sc.run.seed, key="test")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Stages run for one mechanism: returns {scan: (Dataset, particles table)}."""
    cache = {}

    def go(mechanism):
        if mechanism in cache:
            return cache[mechanism]
        root = tmp_path_factory.mktemp(mechanism)
        sc = load_scenario("tiny", [f'sample.mechanism="{mechanism}"'])
        reh = root / "rehearsal"
        reh.mkdir()
        lith = _lithiation(reh)
        ms_dir = root / "microstructure"
        compute_microstructure(_ctx(sc, "microstructure", None, ms_dir, {}))
        out = {}
        for scan in SCANS[:2] if mechanism == "core_shell" else SCANS:
            d = root / scan
            compute_truth(_ctx(sc, "truth", scan, d, {("microstructure", None): ms_dir, ("rehearsal", None): reh}))
            with xr.open_dataset(d / "phantom.nc", engine="h5netcdf") as ds:
                out[scan] = (ds.load(), pd.read_csv(d / "particles.csv"), d, lith)
        cache[mechanism] = out
        return out

    return go


def test_phantom_follows_the_contract(run):
    ds, table, d, _ = run("pathway")["T1"]
    assert ds["phase"].dtype == np.uint8 and ds["particle"].dtype == np.int32
    for name in ("lithiation", "delta", "beta", "displacement"):
        assert ds[name].dtype == np.float32, name
    assert ds["displacement"].dims == ("component", "z", "y", "x")
    assert ds.sizes == {"z": 70, "y": 64, "x": 64, "component": 3}
    assert ds["z"].values[1] == pytest.approx(0.4)
    for key in ("voxel_size_um", "energy_kev", "mechanism", "seed"):
        assert key in ds.attrs
    assert ds.attrs["mechanism"] == "pathway"
    for col in ("id", "z_um", "equivalent_diameter_um", "depth_um", "lithiated_fraction", "mechanism"):
        assert col in table.columns
    assert load_deformation(d).shape == (70, 64, 64)


def test_pristine_scan_is_undeformed_and_crystalline(run):
    ds, table, _, _ = run("pathway")["T0"]
    assert np.all(ds["displacement"].values == 0)
    si = si_mask(ds["phase"].values)
    assert np.all(ds["phase"].values[si] == Phase.SI_CRYSTALLINE)
    assert np.all(ds["lithiation"].values == 0)


@pytest.mark.parametrize("mechanism", ["pathway", "core_shell"])
def test_lithiated_fraction_is_conserved_per_particle(run, mechanism):
    ds, table, _, lith = run(mechanism)["T1"]
    np.testing.assert_allclose(table["measured_fraction"], table["lithiated_fraction"], atol=1e-6)
    f, _ = particle_fractions(lith, "T1", table)
    np.testing.assert_allclose(table["lithiated_fraction"], f)
    assert (table["lithiated_fraction"] > 0).all()


def test_electrode_thickens_toward_the_separator_and_folds_nowhere(run):
    ds, table, d, _ = run("pathway")["T1"]
    uz = ds["displacement"].sel(component="z").values
    z_top = ds.attrs["z_top_voxel"]
    z_cu = ds.attrs["z_cu_voxel"]
    assert np.all(uz[:z_cu] == pytest.approx(0, abs=1e-3))  # the Cu foil does not move
    assert uz[z_top].mean() > uz[(z_cu + z_top) // 2].mean() > 0  # particles near the separator move most (Fig S9)
    dfm = load_deformation(d)
    g = np.indices(ds["phase"].shape)[:, ::3, ::3, ::3].reshape(3, -1).T.astype(float)
    assert np.linalg.det(dfm.gradient(g)).min() > 0


def test_discharged_particles_keep_amorphous_si(run):
    ds, table, _, _ = run("pathway")["T2"]
    phase = ds["phase"].values
    assert (phase == Phase.SI_AMORPHOUS).sum() > 0
    assert (table["max_lithiated_fraction"] >= table["lithiated_fraction"]).all()


def test_picture_is_written(run, tmp_path):
    ds = run("pathway")["T1"][0]
    path = write_phantom_png(ds, tmp_path / "phantom.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pristine_phantom_without_rehearsal_is_the_runs_t0(run):
    """``twin phantom SCENARIO`` (no --scan) draws the same electrode as the microstructure stage of a run."""
    from phantoms.truth import pristine_phantom

    ds_run = run("pathway")["T0"][0]
    ds, table, _ = pristine_phantom(load_scenario("tiny", ['sample.mechanism="pathway"']))
    assert np.array_equal(ds["phase"].values, ds_run["phase"].values)
    assert np.array_equal(ds["delta"].values, ds_run["delta"].values)


def test_prescribed_folding_field_is_refused(run):
    """A prescribed bump that folds the map is refused with the fields to change (exit code 2)."""
    from phantoms.deformation import FoldingError
    from phantoms.truth import load_microstructure, truth_for_scan

    d = run("pathway")["T1"][2]
    ms = load_microstructure(d.parent / "microstructure")
    f = np.zeros(len(ms.particles))
    folding = load_scenario("tiny", ["sample.prescribed_bumps=[[12.0, 12.0, 12.0, 1.0, 3.0, 0.0, 0.0]]"])
    with pytest.raises(FoldingError, match="prescribed_bumps") as err:
        truth_for_scan(ms, folding.sample, 29.6, f, f, scan="T1", scan_index=1, seed=1)
    assert err.value.exit_code == 2


def test_folding_particle_swelling_is_damped_and_the_truth_is_the_field_applied():
    """Every particle fully lithiated on tiny folds the map; the kernels are damped (warned) until det F > 0 everywhere,
    and the recorded deformation and displacement are exactly the field that warped the volumes."""
    from phantoms.microstructure import generate_microstructure
    from phantoms.truth import SWELLING_DAMPING, truth_for_scan
    from twin.warnings import TwinWarning

    sc = load_scenario("tiny")
    ms = generate_microstructure(sc.sample, np.random.default_rng(1))
    full = np.ones(len(ms.particles))
    with pytest.warns(TwinWarning, match="folded the map"):
        ds, _, deformation = truth_for_scan(ms, sc.sample, sc.beamline.energy_kev, full, full, scan="T1", scan_index=1, seed=1)
    scale = ds.attrs["local_swelling_scale"]
    assert scale < 1 and np.isclose(np.log(scale) / np.log(SWELLING_DAMPING), round(np.log(scale) / np.log(SWELLING_DAMPING)))
    u = deformation.displacement_field(check=True)  # raises FoldingError if det F <= 0 anywhere
    np.testing.assert_array_equal(u, ds["displacement"].values)
    # what deformation.json holds (to_dict / from_dict) gives back the same field
    from phantoms.deformation import Deformation

    assert np.array_equal(Deformation.from_dict(deformation.to_dict()).displacement_field(check=False), u)


def test_only_the_kernels_that_fold_the_map_are_damped():
    """Fully lithiated particles near the separator (fragments of cracked ones among them) fold the map where
    their kernels overlap; only kernels reaching a folded voxel are damped: every damped particle's support
    overlaps that of a fully lithiated one, most particles keep their whole swelling (damping all, as a
    global scale would, fails this), and the field applied folds nowhere."""
    import warnings

    from phantoms.deformation import SUPPORT
    from phantoms.microstructure import generate_microstructure
    from phantoms.truth import MIN_KERNEL_RADIUS_VOX, truth_for_scan

    sc = load_scenario("tiny")
    ms = generate_microstructure(sc.sample, np.random.default_rng(1))
    table = ms.particles
    hot = table["depth_um"].to_numpy() < 5
    f = np.where(hot, 1.0, 0.3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds, out, deformation = truth_for_scan(ms, sc.sample, 29.6, f, f, scan="T1", scan_index=1, seed=1)
    damped = out["swelling_scale"].to_numpy() < 1
    radius = table["equivalent_diameter_um"].to_numpy() / 2 / ms.voxel_size_um
    kernel = radius >= MIN_KERNEL_RADIUS_VOX
    centres = table[["z_vox", "y_vox", "x_vox"]].to_numpy()
    apart = np.linalg.norm(centres[:, None] - centres[None], axis=2)
    near_hot = ((apart < SUPPORT * (radius[:, None] + radius[None])) & (hot & kernel)[None]).any(axis=1)
    assert damped.any() and not (damped & ~near_hot).any()
    assert (kernel & ~damped).sum() > 0.6 * kernel.sum()  # measured: 19 of 104 kernels damped
    assert any(f"{damped.sum()} of {kernel.sum()} particles" in str(w.message) for w in caught)
    assert ds.attrs["local_swelling_scale"] == out["swelling_scale"].min() < 1
    np.testing.assert_array_equal(deformation.displacement_field(check=True), ds["displacement"].values)


def test_the_rigid_ramp_over_the_cu_does_not_fold_the_map():
    """The mask m(z) that holds the Cu rigid rises over 2.5× the largest local displacement near the Cu, so
    m′ |u| ≤ 0.75 at every voxel of the ramp (measured 0.61 here) and half-lithiated particles swell without any
    damping (with a ramp sized by the largest single kernel, which their superposition exceeds, this field
    folded just above the Cu and every kernel was damped)."""
    import warnings

    from phantoms.deformation import _dsmoothstep
    from phantoms.microstructure import generate_microstructure
    from phantoms.truth import RAMP_FACTOR, truth_for_scan

    sc = load_scenario("tiny")
    ms = generate_microstructure(sc.sample, np.random.default_rng(1))
    f = np.full(len(ms.particles), 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fold, no damping warning
        _, out, d = truth_for_scan(ms, sc.sample, 29.6, f, f, scan="T1", scan_index=1, seed=1)
    assert (out["swelling_scale"] == 1).all() and len(d.swell_radius) > 50
    voxels = np.indices(ms.phase.shape).reshape(3, -1).T.astype(float)
    s = (voxels[:, 0] - d.rigid_below_z) / d.rigid_ramp_vox
    u, _ = d._local_sum(voxels, False)
    slope_times_u = _dsmoothstep(s) / d.rigid_ramp_vox * np.linalg.norm(u, axis=1)
    assert 0.3 < slope_times_u.max() <= 1.875 / RAMP_FACTOR


def test_streamed_truth_file_is_the_in_memory_dataset_written(tmp_path, monkeypatch):
    """write_truth (slab by slab into phantom.nc, a fold retry included, the planes compressed by the write-behind
    thread) gives the file write_netcdf writes of truth_for_scan's Dataset: the same variables, values, attributes
    and coordinates; a failure (a fold, the disk full in the writer thread) leaves no file."""
    from phantoms.deformation import FoldingError
    from phantoms.microstructure import generate_microstructure
    from phantoms.truth import truth_for_scan, write_truth
    from twin.warnings import TwinWarning

    sc = load_scenario("tiny", ["sample.gas_bubble_scans=[\"T1\"]"])
    ms = generate_microstructure(sc.sample, np.random.default_rng(2))
    f = np.full(len(ms.particles), 0.9)
    with pytest.warns(TwinWarning, match="folded the map"):
        ds, table, _ = truth_for_scan(ms, sc.sample, 29.6, f, f, scan="T1", scan_index=1, seed=3)
    write_netcdf(ds, tmp_path / "memory.nc")
    with pytest.warns(TwinWarning, match="folded the map"):
        streamed_table, _ = write_truth(ms, sc.sample, 29.6, f, f, scan="T1", scan_index=1, seed=3, path=tmp_path / "phantom.nc")
    with xr.open_dataset(tmp_path / "memory.nc", engine="h5netcdf") as a, \
            xr.open_dataset(tmp_path / "phantom.nc", engine="h5netcdf") as b:
        xr.testing.assert_identical(a.load(), b.load())
    pd.testing.assert_frame_equal(table, streamed_table)
    bad = sc.sample.model_copy(update={"prescribed_bumps": [[8.0, 12.8, 12.8, 1.0, 8.0, 0.0, 0.0]]})
    with pytest.raises(FoldingError):
        write_truth(ms, bad, 29.6, f, f, scan="T1", scan_index=1, seed=3, path=tmp_path / "folded.nc")

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("twin.io._store", disk_full)
    with pytest.warns(TwinWarning), pytest.raises(OSError, match="No space left"):
        write_truth(ms, sc.sample, 29.6, f, f, scan="T1", scan_index=1, seed=3, path=tmp_path / "full.nc")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory.nc", "phantom.nc"]


@pytest.mark.parametrize("block", [1, 3])
def test_optics_rules_give_the_delta_beta_volumes_and_their_warp(block):
    """δ, β evaluated where sampled equal the volumes built by the documented rules (NumPy here), and warping
    them as derived fields equals warping those volumes trilinearly (also with phases in blocks of 3³ voxels and
    x smooth, where the rule is evaluated once at the interpolated x or porosity); the scan's sampler of all five
    volumes at once equals the separate samplers."""
    from phantoms import optics
    from phantoms.deformation import Deformation
    from phantoms.truth import OpticsRules

    rng = np.random.default_rng(4)
    shape = (12, 10, 14)
    coarse = tuple(-(-n // block) for n in shape)
    phase = rng.integers(0, len(Phase), coarse).astype(np.uint8)
    phase = phase.repeat(block, 0).repeat(block, 1).repeat(block, 2)[:shape[0], :shape[1], :shape[2]]
    smooth = 3.75 * np.linspace(0, 1, shape[0])[:, None, None] * np.linspace(0.2, 1, shape[2])
    x = np.where(np.isin(phase, [Phase.SI_LITHIATED, Phase.SI_AMORPHOUS, Phase.SI_CRYSTALLINE]),
                 rng.uniform(0, 3.75, shape) if block == 1 else smooth, 0).astype(np.float32)
    porosity = rng.uniform(0.1, 0.9, shape).astype(np.float32)
    partial = rng.random(shape) < (0.2 if block == 1 else 0.02)
    oc = optics.optical_constants(29.6)
    w = 0.3
    lix0 = [np.interp(0.0, oc.lixsi_x, t) for t in (oc.lixsi_delta, oc.lixsi_beta)]
    rules = OpticsRules.of(oc, phase, x, porosity, partial, w)
    deformation = Deformation(shape, 0.2, homogeneous_F=[[1.05, 0.02, 0], [0, 0.97, 0.01], [0.01, 0, 1.02]])
    volumes = rules.volumes()
    warped = deformation.warp({}, derived={("delta", "beta"): (rules.sample, np.float64)})
    for col, (per_phase, table, solid, el, c_si, sei) in enumerate((
            (oc.phase_delta, oc.lixsi_delta, oc.cbd_solid_delta, oc.phase_delta[Phase.ELECTROLYTE],
             oc.phase_delta[Phase.SI_CRYSTALLINE], oc.phase_delta[Phase.SEI]),
            (oc.phase_beta, oc.lixsi_beta, oc.cbd_solid_beta, oc.phase_beta[Phase.ELECTROLYTE],
             oc.phase_beta[Phase.SI_CRYSTALLINE], oc.phase_beta[Phase.SEI]))):
        ref = np.vectorize(lambda p: per_phase.get(Phase(p), 0.0))(phase).astype(float)
        ref[phase == Phase.CBD] = ((1 - porosity) * solid + porosity * el)[phase == Phase.CBD]
        lix = np.interp(x, oc.lixsi_x, table)
        amorphous = (phase == Phase.SI_LITHIATED) | (phase == Phase.SI_AMORPHOUS)
        ref[amorphous] = lix[amorphous]
        ref[phase == Phase.SI_CRYSTALLINE] = (c_si + lix - lix0[col])[phase == Phase.SI_CRYSTALLINE]
        ref[partial] = (1 - w) * ref[partial] + w * sei
        np.testing.assert_allclose(volumes[col], ref, rtol=1e-6)
        np.testing.assert_allclose(warped[("delta", "beta")[col]], deformation.warp({"v": (ref, 1)})["v"], rtol=1e-6)  # ref: float32 products
    particle = rng.integers(0, 50, shape).astype(np.int32)
    names = ("phase", "particle", "lithiation", "delta", "beta")
    together = deformation.warp({}, derived={names: (rules.scan_sampler(particle),
                                                     (np.uint8, np.int32, np.float32, np.float32, np.float32))})
    apart = deformation.warp({"phase": (phase, 0), "particle": (particle, 0), "lithiation": (x, 1)},
                             derived={("delta", "beta"): (rules.sample, np.float32)})
    for name in names:  # one pass gives what the separate samplers give, beyond the borders (clamped) too
        assert together[name].dtype == apart[name].dtype
        np.testing.assert_array_equal(together[name], apart[name])


@pytest.mark.parametrize("mechanism", ["core_shell", "pathway"])
def test_volume_ratios_and_swelling_density_are_the_per_voxel_means(mechanism):
    """J per particle, the measured fraction and the swelling per plane equal their per-voxel definitions
    (J = Ω(x)/Ω_c, crystalline voxels 1 + Ω(x) − Ω(0)) summed voxel by voxel here."""
    from phantoms import optics
    from phantoms.microstructure import generate_microstructure
    from phantoms.truth import scan_state

    sc = load_scenario("tiny", [f'sample.mechanism="{mechanism}"'])
    ms = generate_microstructure(sc.sample, np.random.default_rng(2))
    f = np.random.default_rng(3).uniform(0, 0.8, len(ms.particles))
    state = scan_state(ms, sc.sample, sc.beamline.energy_kev, f, np.maximum(f, 0.5))
    si = ms.particle > 0
    x = state["lithiation"][si].astype(float)
    omega = optics.lixsi_volume_ratio(x, expansion=sc.sample.lithiated_volume_expansion)
    crystalline = state["phase"][si] == Phase.SI_CRYSTALLINE
    J_vox = np.where(crystalline, 1 + omega - optics.lixsi_volume_ratio(0.0, expansion=sc.sample.lithiated_volume_expansion),
                     omega)
    labels = ms.particle[si]
    ids = ms.particles["id"].to_numpy()
    counts = np.bincount(labels, minlength=ids.max() + 1)[ids]
    np.testing.assert_allclose(state["volume_ratio"], np.bincount(labels, J_vox, ids.max() + 1)[ids] / counts, rtol=1e-12)
    np.testing.assert_allclose(state["measured_fraction"],
                               np.bincount(labels, x / 3.75, ids.max() + 1)[ids] / counts, rtol=1e-12, atol=1e-15)
    z = np.nonzero(si)[0]
    plane = si.shape[1] * si.shape[2]
    np.testing.assert_allclose(state["swelling_density"], np.bincount(z, J_vox - 1, si.shape[0]) / plane, rtol=1e-10,
                               atol=1e-15)
    assert crystalline.any() and (x > 0).any()
