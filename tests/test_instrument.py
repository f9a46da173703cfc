"""Instrument forward model against analytic truth: Fresnel edge, weak-object CTF, conservation, chord lengths, NXtomo."""

from __future__ import annotations

import math
import warnings

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twin._fresnel import FresnelPropagator, fresnel_half_plane
from twin.instrument import Instrument, LineIntegrals, cone_geometry, write_nxtomo, write_scan
from twin.scenario import load_scenario
from twin.warnings import TwinWarning

WAVELENGTH_M = 1.239841984e-6 / 29.6e3  # 29.6 keV


def _slab_wave_error(pixel_m: float, distance_m: float = 0.008) -> float:
    """Max intensity error near one edge of a wide complex-transmission slab vs the Fresnel-integral solution."""
    length_m = 4e-4
    n = int(round(length_m / pixel_m))
    x = (np.arange(n) - n / 2 + 0.5) * pixel_m
    a, b = -length_m / 8, length_m / 8
    t = np.exp(-0.3 - 0.5j)  # absorbing and phase-shifting edge
    row = np.where((x > a) & (x < b), t, 1.0)
    with warnings.catch_warnings():
        # The rows axis is constant: its short padded length triggers the aliasing check without aliasing anything.
        warnings.simplefilter("ignore", TwinWarning)
        prop = FresnelPropagator((16, n), pixel_size_m=pixel_m, wavelength_m=WAVELENGTH_M, distance_m=distance_m)
    numeric = prop(np.tile(row, (16, 1)))[8]
    kw = dict(wavelength_m=WAVELENGTH_M, distance_m=distance_m)
    analytic = 1 + (t - 1) * (fresnel_half_plane(x - a, **kw) - fresnel_half_plane(x - b, **kw))
    near = np.abs(x - a) < 4e-6
    return float(np.max(np.abs(np.abs(numeric[near]) ** 2 - np.abs(analytic[near]) ** 2)))


def test_fresnel_edge_matches_fresnel_integrals_and_converges():
    # Measured: 0.0295 at 50 nm, 0.0040 at 25 nm, 0.0017 at 12.5 nm (pixelated edge vs continuous edge).
    e50, e25, e12 = (_slab_wave_error(p) for p in (5e-8, 2.5e-8, 1.25e-8))
    assert e25 < 0.01  # 2.5x margin over the measured 0.004
    assert e12 < e25 < e50  # converges with sampling
    assert e50 / e12 > 5


def test_weak_phase_object_follows_linear_ctf():
    """Ĩ(f) = −2 sin(πλz f²) φ̃(f) for a pure weak phase object ψ = exp(−iφ)."""
    n, pixel_m, z = 256, 1e-7, 0.006
    rng = np.random.default_rng(1)
    phi = rng.standard_normal((n, n))
    phi = np.real(np.fft.ifft2(np.fft.fft2(phi) * np.exp(-((np.fft.fftfreq(n)[:, None] ** 2 + np.fft.fftfreq(n) ** 2) / 0.02))))
    phi *= 1e-3 / phi.std()
    prop = FresnelPropagator((n, n), pixel_size_m=pixel_m, wavelength_m=WAVELENGTH_M, distance_m=z, pad_factor=1)
    intensity = np.abs(prop(np.exp(-1j * phi))) ** 2
    f = np.fft.fftfreq(n, d=pixel_m)
    chi = np.pi * WAVELENGTH_M * z * (f[:, None] ** 2 + f[None, :] ** 2)
    expected = -2 * np.sin(chi) * np.fft.fft2(phi)
    measured = np.fft.fft2(intensity - 1)
    strong = np.abs(expected) > 0.05 * np.abs(expected).max()
    rel = np.abs(measured[strong] - expected[strong]) / np.abs(expected[strong])
    # Second-order terms are O(φ) = 1e-3 relative; measured median ~1e-3.
    assert np.median(rel) < 0.01
    assert strong.sum() > 100


@settings(max_examples=25, deadline=None)
@given(
    shape=st.tuples(st.sampled_from([16, 32, 48, 64]), st.sampled_from([16, 30, 64, 72])),
    distance_m=st.floats(1e-4, 2e-2),
    seed=st.integers(0, 2**32 - 1),
)
def test_propagation_conserves_mean_intensity(shape, distance_m, seed):
    rng = np.random.default_rng(seed)
    wave = rng.uniform(0.2, 1.0, shape) * np.exp(1j * rng.uniform(-3, 3, shape))
    pixel = math.sqrt(WAVELENGTH_M * distance_m / min(shape)) * 1.01  # just alias-free on the unpadded grid
    prop = FresnelPropagator(shape, pixel_size_m=pixel, wavelength_m=WAVELENGTH_M, distance_m=distance_m, pad_factor=1)
    if prop.padded_shape != prop.shape:
        return  # only the unpadded (periodic) case is exactly unitary
    out = prop(wave)
    assert np.mean(np.abs(out) ** 2) == pytest.approx(np.mean(np.abs(wave) ** 2), rel=1e-10)


def test_aliasing_is_warned():
    with pytest.warns(TwinWarning, match="aliases"):
        FresnelPropagator((32, 32), pixel_size_m=5e-8, wavelength_m=WAVELENGTH_M, distance_m=0.008)


@settings(max_examples=30, deadline=None)
@given(d=st.floats(1e-4, 0.05), length=st.floats(0.3, 2.0))
def test_cone_geometry_inverts_effective_distance(d, length):
    if length <= 4 * d:
        return
    z1, z2, m = cone_geometry(d, length)
    assert z1 * z2 / (z1 + z2) == pytest.approx(d, rel=1e-9)
    assert m == pytest.approx((z1 + z2) / z1, rel=1e-12)


# Line integrals -------------------------------------------------------------------------------


def _supersampled_ellipsoid(shape, centre, semi_axes, factor=4):
    """Fractional occupancy of an axis-aligned ellipsoid (z, y, x) by in-plane supersampling."""
    nz, ny, nx = shape
    sub = (np.arange(factor) + 0.5) / factor - 0.5
    z = np.arange(nz)[:, None, None, None, None]
    y = (np.arange(ny)[:, None] + sub[None, :])[None, :, None, :, None]
    x = (np.arange(nx)[:, None] + sub[None, :])[None, None, :, None, :]
    inside = ((z - centre[0]) / semi_axes[0]) ** 2 + ((y - centre[1]) / semi_axes[1]) ** 2 + ((x - centre[2]) / semi_axes[2]) ** 2 <= 1
    return inside.mean(axis=(3, 4)).astype(np.float32)


def _chord(shape, centre, semi_axes, theta, n_columns):
    """Analytic chord length through the ellipsoid for every (row, detector column) at angle θ, ASTRA's convention."""
    nz, ny, nx = shape
    u = np.arange(n_columns) - (n_columns - 1) / 2
    zc = np.arange(nz)[:, None] - centre[0]
    # voxel (row, col) → x = col − (nx−1)/2, y = (ny−1)/2 − row; the ellipsoid centre in those coordinates:
    x0, y0 = centre[2] - (nx - 1) / 2, (ny - 1) / 2 - centre[1]
    az, ay, ax = semi_axes
    # ray: (x, y) = u (cos θ, sin θ) + t (−sin θ, cos θ)
    px, py = u * np.cos(theta) - x0, u * np.sin(theta) - y0
    dx, dy = -np.sin(theta), np.cos(theta)
    a = (dx / ax) ** 2 + (dy / ay) ** 2
    b = 2 * (px * dx / ax**2 + py * dy / ay**2)
    c = (px / ax) ** 2 + (py / ay) ** 2 + (zc / az) ** 2 - 1
    disc = b**2 - 4 * a * c
    return np.where(disc > 0, np.sqrt(np.maximum(disc, 0)) / a, 0.0)


@pytest.mark.parametrize("semi_axes", [(14.0, 14.0, 14.0), (10.0, 16.0, 9.0)], ids=["sphere", "ellipsoid"])
def test_line_integrals_match_chord_lengths(semi_axes):
    shape, centre = (36, 48, 48), (17.5, 22.3, 25.1)
    vol = _supersampled_ellipsoid(shape, centre, semi_axes)
    angles = np.deg2rad([0.0, 33.0, 90.0, 151.0, 270.0])
    proj = LineIntegrals(shape, 72, angles)(vol)  # (nz, angles, cols)
    for i, theta in enumerate(angles):
        expected = _chord(shape, centre, semi_axes, theta, 72)
        # Mass is exact up to the projector's edge handling; chords (> 3 voxels, away from grazing rays) to
        # 0.35 voxel rms: measured <= 0.25 for the linear (Joseph) projector, not shrinking with finer voxelization,
        # while a wrong angle convention gives 1.3-2.9.
        assert proj[:, i].sum() == pytest.approx(vol.sum(), rel=2e-3)
        long = expected > 3
        rms = np.sqrt(np.mean((proj[:, i] - expected)[long] ** 2))
        assert rms < 0.35, (theta, rms)


# Whole instrument -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_scan(tmp_path_factory):
    sc = load_scenario("tiny", ["beamline.n_projections=24", "beamline.n_flats=4", "beamline.n_darks=3"])
    shape = (20, 24, 24)
    vol = _supersampled_ellipsoid(shape, (9.5, 11.5, 12.5), (6.0, 7.0, 7.0), factor=2)
    delta = (1e-7 + 4.5e-7 * vol).astype(np.float32)
    beta = (1e-10 + 4.5e-7 / 477 * vol).astype(np.float32)
    inst = Instrument(sc, volume_shape=shape)
    frames = inst.simulate(delta, beta, rng=np.random.default_rng(3))
    path = write_nxtomo(tmp_path_factory.mktemp("scan") / "scan.nx", inst, frames)
    return sc, inst, frames, path


def test_frames_have_expected_counts_and_noise(small_scan):
    sc, inst, frames, _ = small_scan
    b = sc.beamline
    fr = frames[0]
    keys = fr["image_key"]
    assert (keys == 2).sum() == b.n_darks and (keys == 1).sum() == b.n_flats and (keys == 0).sum() == b.n_projections
    darks = fr["data"][keys == 2]
    flats = fr["data"][keys == 1]
    # Darks: offset + dark current, read noise (independent: the scenario's numbers).
    standard_error = math.sqrt(inst.read_noise_counts**2 + inst.dark_counts) / math.sqrt(darks.size)
    assert darks.mean() == pytest.approx(b.dark_offset_counts + inst.dark_counts, abs=5 * standard_error)
    assert darks.std() == pytest.approx(math.sqrt(inst.read_noise_counts**2 + inst.dark_counts), rel=0.1)
    expected_flat = inst.photons_per_pixel * inst.efficiency
    assert (flats.mean() - darks.mean()) == pytest.approx(expected_flat, rel=0.03)  # drift 2 %, gain mean 1
    # Poisson: the frame-to-frame variance of one pixel equals its mean signal (gain ~1), within sampling.
    first = flats[:2]
    var = np.var(first[0] - first[1]) / 2
    assert var == pytest.approx(expected_flat * (1 + b.gain_sigma**2), rel=0.15)


def test_noise_free_oracle_frames_flat_field_to_the_exact_holograms():
    """Oracle holograms: with the beam steady, (projection − dark)/(flat − dark) is the noise-free intensity exactly,
    while the gain pattern and illumination non-uniformity (kept: they are not noise) are still in the raw frames."""
    sc = load_scenario("tiny", ["beamline.n_projections=6", "beamline.n_flats=2", "beamline.n_darks=2",
                                "beamline.beam_drift_fraction=0", "beamline.unstable_pixel_fraction=0",
                                "oracle.noise_free_holograms=true"])
    shape = (12, 16, 16)
    vol = _supersampled_ellipsoid(shape, (5.5, 7.5, 8.0), (4.0, 5.0, 5.0), factor=2)
    delta, beta = (4.5e-7 * vol).astype(np.float32), (4.5e-7 / 477 * vol).astype(np.float32)
    inst = Instrument(sc, volume_shape=shape)
    intensities = inst.holograms(*inst.line_integrals(delta, beta))
    frames = inst.simulate(delta, beta, rng=np.random.default_rng(5))
    for stack, fr in zip(intensities, frames):
        keys, data = fr["image_key"], fr["data"].astype(np.float64)
        dark, flat = data[keys == 2], data[keys == 1]
        assert np.ptp(dark, axis=0).max() == 0 and np.ptp(flat, axis=0).max() == 0  # no frame-to-frame noise
        assert flat[0].std() / flat[0].mean() > 0.01  # fixed pattern kept
        corrected = (data[keys == 0] - dark[0]) / (flat[0] - dark[0])
        np.testing.assert_allclose(corrected, stack, rtol=1e-5)


def test_nxtomo_file_opens_in_nabu_and_nxtomo(small_scan):
    from nabu.resources.dataset_analyzer import analyze_dataset
    from nxtomo.application.nxtomo import NXtomo

    sc, inst, frames, path = small_scan
    g = inst.geometry
    for i, d in enumerate(sc.beamline.propagation_distances_m):
        ds = analyze_dataset(str(path), extra_options={"hdf5_entry": f"entry{i:04d}"})
        assert ds.radio_dims == (g.n_columns, g.n_rows)
        assert ds.n_angles == sc.beamline.n_projections
        assert ds.energy == pytest.approx(sc.beamline.energy_kev)
        assert ds.pixel_size == pytest.approx(sc.sample.voxel_size_um)
        nx = NXtomo().load(str(path), data_path=f"entry{i:04d}")
        assert nx.sample.propagation_distance.to("m").magnitude == pytest.approx(d)
        assert np.array_equal(np.array([k.value for k in nx.instrument.detector.image_key_control]), frames[i]["image_key"])
        with h5py.File(path, "r") as f:
            assert np.array_equal(f[f"entry{i:04d}/instrument/detector/data"][()], frames[i]["data"])


def _jittered_scan(n_projections: int):
    sc = load_scenario("tiny", [f"beamline.n_projections={n_projections}", "beamline.n_flats=4", "beamline.n_darks=3",
                                "beamline.jitter_sigma_px=0.5", "beamline.rotation_axis_offset_px=1.5"])
    shape = (10, 16, 16)
    vol = _supersampled_ellipsoid(shape, (4.5, 7.5, 7.5), (3.5, 5.0, 5.0))
    return Instrument(sc, volume_shape=shape), (4.5e-7 * vol).astype(np.float32), (1e-9 * vol).astype(np.float32)


def test_frames_do_not_depend_on_how_many_angles_are_simulated_at_once():
    """Every distance draws its own noise frame by frame in acquisition order: chunks of 1, 5 or all angles give
    the same frames bit for bit, and the streamed file holds exactly the frames simulated in memory."""
    inst, delta, beta = _jittered_scan(12)

    def frames(step):
        out = [np.empty((inst.frame_layout()["image_key"].size, inst.geometry.n_rows, inst.geometry.n_columns), np.float32)
               for _ in inst.propagators]
        for d, first, chunk in inst.frame_chunks(delta, beta, rng=np.random.default_rng(7), angles_per_chunk=step):
            out[d][first:first + len(chunk)] = chunk
        return out

    whole = frames(12)
    for step in (1, 5):
        for a, b in zip(whole, frames(step)):
            assert np.array_equal(a, b)
    assert not np.array_equal(whole[0], whole[1])  # distances differ (their own holograms and noise)


def test_written_scan_equals_the_simulation_and_reads_in_nabu(tmp_path):
    from nabu.resources.dataset_analyzer import analyze_dataset

    inst, delta, beta = _jittered_scan(12)
    in_memory = inst.simulate(delta, beta, rng=np.random.default_rng(7))
    path = write_scan(tmp_path / "scan.nx", inst, delta, beta, rng=np.random.default_rng(7))
    assert [p.name for p in tmp_path.iterdir()] == ["scan.nx"]  # nothing else left behind
    with h5py.File(path, "r") as f:
        for i, fr in enumerate(in_memory):
            assert np.array_equal(f[f"entry{i:04d}/instrument/detector/data"][()], fr["data"])
            assert np.array_equal(f[f"entry{i:04d}/data/data"][()], fr["data"])  # the NXdata link follows
            assert np.array_equal(f[f"entry{i:04d}/instrument/detector/image_key_control"][()], fr["image_key"])
    ds = analyze_dataset(str(path), extra_options={"hdf5_entry": "entry0001"})
    assert ds.radio_dims == (inst.geometry.n_columns, inst.geometry.n_rows) and ds.n_angles == 12


def test_streamed_scan_memory_does_not_grow_with_the_projections(tmp_path, monkeypatch):
    """With chunks of 8 angles, writing 96 projections holds hardly more than writing 24 (NumPy's traced peak), while
    holding them in memory grows by the 72 extra frames of every distance."""
    import tracemalloc

    import twin.instrument as instrument

    def peak(n_projections, stream):
        inst, delta, beta = _jittered_scan(n_projections)
        monkeypatch.setattr(instrument, "HOLOGRAM_CHUNK_BYTES",
                            8 * instrument.hologram_bytes_per_angle(4, inst.geometry.n_rows * inst.geometry.n_columns))
        assert inst.angles_per_chunk() == 8
        tracemalloc.start()
        if stream:
            write_scan(tmp_path / f"s{n_projections}.nx", inst, delta, beta, rng=np.random.default_rng(0))
        else:
            inst.simulate(delta, beta, rng=np.random.default_rng(0))
        top = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return top

    peak(8, stream=False), peak(8, stream=True)  # first calls import and cache (h5py, nxtomo, pint): not the frames
    inst = _jittered_scan(24)[0]
    extra_frames_bytes = 4 * 72 * inst.geometry.n_rows * inst.geometry.n_columns * 4  # 4 distances, float32
    # measured: 1.007 (in memory) and 0.014 (streamed) of the extra frames' bytes
    assert peak(96, stream=False) - peak(24, stream=False) > 0.9 * extra_frames_bytes
    assert peak(96, stream=True) - peak(24, stream=True) < 0.1 * extra_frames_bytes


def test_rotation_axis_offset_and_jitter_shift_the_projections():
    sc = load_scenario("tiny", ["beamline.n_projections=16", "beamline.rotation_axis_offset_px=2.5", "beamline.jitter_sigma_px=0.7"])
    shape = (8, 24, 24)
    vol = _supersampled_ellipsoid(shape, (3.5, 11.5, 11.5), (3.0, 6.0, 6.0))
    inst = Instrument(sc, volume_shape=shape)
    paths = inst.line_integrals(vol * 1e-7, vol * 1e-10)
    before = paths[0].copy()
    inst.shift_projections(paths, inst.projection_shifts(np.random.default_rng(0)))
    cols = np.arange(before.shape[-1])
    centroid = lambda p: (p.sum(axis=1) * cols).sum(axis=-1) / p.sum(axis=(1, 2))  # noqa: E731
    moved = centroid(paths[0] - paths[0].min()) - centroid(before - before.min())
    # mean shift = the axis offset; spread = the jitter (16 draws of σ 0.7 px: sample std within ~0.35-1.1)
    assert moved.mean() == pytest.approx(2.5, abs=3 * 0.7 / 4)
    assert 0.3 < moved.std() < 1.2


@pytest.mark.parametrize("mean_counts", [3.0, 200.0, 999.0, 1000.0, 5e4])
def test_photon_counts_have_poisson_mean_and_variance(mean_counts):
    from twin.instrument import NORMAL_APPROXIMATION_MIN_COUNTS, photon_counts

    n = 400_000
    raw = photon_counts(np.full(n, mean_counts), np.random.default_rng(0))
    assert raw.dtype == np.float32 and raw.shape == (n,)
    counts = raw.astype(np.float64)
    # sampling errors of the mean and the variance: sqrt(λ/n) and about λ sqrt(2/n)
    assert counts.mean() == pytest.approx(mean_counts, abs=5 * math.sqrt(mean_counts / n))
    assert counts.var() == pytest.approx(mean_counts, rel=5 * math.sqrt(2 / n) + 1 / mean_counts)
    if mean_counts < NORMAL_APPROXIMATION_MIN_COUNTS:  # drawn exactly: whole counts, Poisson's skewness 1/sqrt(λ)
        assert np.all(counts == np.round(counts))
        skew = np.mean((counts - counts.mean()) ** 3) / counts.std() ** 3
        assert skew == pytest.approx(1 / math.sqrt(mean_counts), abs=0.02)


def test_photon_counts_draw_dim_and_bright_pixels_of_one_frame_by_their_own_law():
    from twin.instrument import photon_counts

    expected = np.where(np.arange(200_000) % 2 == 0, 4.0, 3.0e4)
    counts = photon_counts(expected, np.random.default_rng(1))
    dim, bright = counts[::2], counts[1::2]
    assert np.all(dim == np.round(dim)) and dim.mean() == pytest.approx(4.0, abs=0.03)
    assert bright.mean() == pytest.approx(3.0e4, abs=3) and bright.var() == pytest.approx(3.0e4, rel=0.03)
    assert np.all(photon_counts(np.array([-2.0, 0.0]), np.random.default_rng(2)) == 0)


def test_one_spectrum_serves_every_distance_of_a_grid():
    wave = np.exp(-1j * np.random.default_rng(0).random((24, 40))).astype(np.complex64)
    near, far = (FresnelPropagator((24, 40), pixel_size_m=1e-7, wavelength_m=4.2e-11, distance_m=d) for d in (0.005, 0.008))
    spectrum = near.spectrum(wave)
    kept = spectrum.copy()
    np.testing.assert_array_equal(far.from_spectrum(spectrum), far(wave))
    np.testing.assert_array_equal(spectrum, kept)  # left as it is for the next distance
    other = FresnelPropagator((20, 40), pixel_size_m=1e-7, wavelength_m=4.2e-11, distance_m=0.005)
    with pytest.raises(ValueError, match="spectrum"):
        other.from_spectrum(spectrum)
