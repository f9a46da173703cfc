"""Holotomographic reconstruction of an NXtomo scan: flat/dark → phase retrieval → FBP → deringing → equalization.

The same code runs on the twin's files and on a beamline's (it never reads the
truth). Steps, by slabs of detector rows with bounded memory, slabs in
parallel threads (NumPy FFTs and ASTRA release the GIL):

1. flat/dark correction with nabu, interpolating between flat series
   (:func:`pipeline.phase.flat_field`);
2. phase retrieval to ``∫δ dl``: nabu's Paganin at one distance (seed: δ/β =
   170) or the multi-distance CTF of :mod:`pipeline.phase`, after registering
   the distances' magnifications and shifts onto the first distance's grid;
3. sinograms; ring removal with nabu's deringers (``munch``: wavelet–Fourier,
   Münch et al., Opt. Express 17, 8567 (2009), doi:10.1364/OE.17.008567;
   ``vo``: Vo et al. 2018, needs algotom);
4. centre of rotation: estimated once from opposite projections with nabu's
   :class:`~nabu.estimation.cor.CenterOfRotation`, or the file's value;
5. FBP (:mod:`pipeline.fbp`) onto the output grid, divided by the pixel size
   so the volume is δ;
6. histogram equalization with scikit-image's CDF, as the seed does
   (``exposure.equalize_hist``), applied slab by slab with the volume's global
   histogram.

Slabs overlap by a margin of detector rows (six Paganin decay lengths
``√((δ/β) λ D / 4π)``) because phase retrieval mixes rows.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.ndimage

from pipeline import phase as _phase
from pipeline.fbp import make_backend
from pipeline.nxtomo_io import DARK, FLAT, PROJECTION, Scan, open_scan
from twin.errors import InputFileError
from twin.scenario import Reconstruction

log = logging.getLogger("pipeline.reconstruction")

#: Projections flat-fielded and phase-retrieved together inside a slab (bounds memory).
PROJECTION_CHUNK = 32


@dataclass
class ReconstructionResult:
    """A reconstructed volume and what was done to get it.

    Attributes
    ----------
    delta : float32 (z, y, x), the quantitative δ.
    volume : float32 (z, y, x), after ring removal and histogram equalization.
    voxel_size_um : float.
    info : dict of plain numbers and strings (centre of rotation, timings, …).
    """

    delta: np.ndarray
    volume: np.ndarray
    voxel_size_um: float
    info: dict = field(default_factory=dict)


class Reconstructor:
    """Reconstruct one NXtomo scan with the scenario's ``reconstruction`` parameters.

    Parameters
    ----------
    scan : Scan
        From :func:`pipeline.nxtomo_io.open_scan`.
    params : Reconstruction
        The scenario's ``reconstruction`` section.
    volume_shape : (nz, ny, nx), optional
        Output grid. Default: the twin's grid recorded in the file, else every
        detector row and ``n_columns × n_columns`` slices.
    workers : int
        Slabs reconstructed at the same time.
    """

    def __init__(self, scan: Scan, params: Reconstruction, *, volume_shape=None, workers: int = 1):
        self.scan = scan
        self.params = params
        self.workers = max(1, int(workers))
        ref = scan.reference
        self.n_rows, self.n_columns = ref.frame_shape
        sim = scan.simulation or {}
        if volume_shape is None:
            volume_shape = sim.get("volume_shape") or (self.n_rows, self.n_columns, self.n_columns)
        self.volume_shape = tuple(int(n) for n in volume_shape)
        # The twin records where its phantom sits on the detector; otherwise take the middle rows.
        self.row_offset = int(sim["row_offset"]) if "row_offset" in sim else (self.n_rows - self.volume_shape[0]) // 2
        if self.row_offset < 0 or self.row_offset + self.volume_shape[0] > self.n_rows:
            raise InputFileError(scan.path, f"dataset {ref.data_path}: {self.n_rows} detector rows cannot hold {self.volume_shape[0]} "
                                 f"slices from row {self.row_offset}")
        if params.phase_retrieval == "paganin":
            if params.paganin_distance_index >= len(scan.distances):
                raise InputFileError(
                    scan.path,
                    f"reconstruction.paganin_distance_index = {params.paganin_distance_index} but the file has {len(scan.distances)} distances",
                )
            self.entries = [scan.distances[params.paganin_distance_index]]
        else:
            self.entries = list(scan.distances)
        self.pixel_size_m = ref.pixel_size_m
        self.angles_rad = np.deg2rad(ref.projection_angles_deg)
        wavelength = 1.239841984e-6 / (ref.energy_kev * 1e3)
        decay_px = math.sqrt(params.delta_beta * wavelength * max(e.propagation_distance_m for e in self.entries) / (4 * math.pi)) / self.pixel_size_m
        self.margin_rows = int(math.ceil(6 * decay_px)) + 4
        self.cone = any(not math.isclose(e.pixel_size_m, self.pixel_size_m, rel_tol=1e-6) for e in self.entries)
        self.info: dict = {"phase_retrieval": params.phase_retrieval, "delta_beta": params.delta_beta,
                           "distances_m": [e.propagation_distance_m for e in self.entries], "margin_rows": self.margin_rows}

    # -- pieces -----------------------------------------------------------------------------
    def _corrected(self, entry, rows: slice, which=None, references=None) -> np.ndarray:
        """Flat/dark-corrected projections ``which`` of one entry, rows ``rows``; ``references`` = (flats, darks) if read already."""
        proj = entry.read(PROJECTION, rows, which)
        flats, darks = references if references is not None else (entry.read(FLAT, rows), entry.read(DARK, rows))
        return _phase.flat_field(proj, flats, darks, image_key=entry.image_key, which=which, path=entry.path)

    def estimate_center_offset(self) -> float:
        """Rotation axis − detector centre, pixels, from pairs of opposite projections (nabu), median of up to 8 pairs."""
        from nabu.estimation.cor import CenterOfRotation

        entry = self.scan.reference
        angles = entry.projection_angles_deg
        r0 = self.row_offset
        rows = slice(r0, r0 + self.volume_shape[0])
        pairs = []
        for i in np.unique(np.linspace(0, angles.size - 1, 24).astype(int)):
            target = (angles[i] + 180.0) % 360.0
            j = int(np.argmin(np.abs(((angles - target) + 180.0) % 360.0 - 180.0)))
            if abs(((angles[j] - target) + 180.0) % 360.0 - 180.0) <= 0.5 * float(np.median(np.diff(angles))) + 1e-9:
                pairs.append((i, j))
        needed = sorted({k for pair in pairs for k in pair})
        position = {k: n for n, k in enumerate(needed)}
        # Smoothing (σ = 1.5 px, symmetric: it cannot move the axis) keeps nabu's correlation peak fit stable on noisy frames.
        images = scipy.ndimage.gaussian_filter(self._corrected(entry, rows, needed), (0, 1.5, 1.5)) if needed else None
        estimator = CenterOfRotation()
        estimates = []
        for i, j in pairs:
            i, j = position[i], position[j]
            try:
                estimates.append(
                    estimator.find_shift(images[i], np.fliplr(images[j]), return_relative_to_middle=True, padding_mode="edge")
                )
            except ValueError as exc:  # nabu refuses a correlation peak it cannot fit (very noisy pair): use the others
                log.info("rotation axis: projections %d and %d gave no estimate (%s)", i, j, exc)
                continue
            if len(estimates) == 8:
                break
        if not estimates:
            raise InputFileError(entry.path, f"dataset {entry.entry}/sample/rotation_angle: no pair of projections 180° apart "
                                 "gave a rotation axis; set reconstruction.rotation_axis = 'file'")
        return float(np.median(estimates))

    def _retriever(self, shape):
        p = self.params
        if p.phase_retrieval == "paganin":
            e = self.entries[0]
            return _phase.Paganin(shape, pixel_size_m=e.pixel_size_m, distance_m=e.propagation_distance_m, energy_kev=e.energy_kev,
                                  delta_beta=p.delta_beta, padding=p.paganin_padding)
        return _phase.MultiDistanceCTF(shape, pixel_size_m=self.pixel_size_m, distances_m=[e.propagation_distance_m for e in self.entries],
                                       energy_kev=self.entries[0].energy_kev, delta_beta=p.delta_beta, lim1=p.ctf_lim1, lim2=p.ctf_lim2)

    def _distance_shifts(self) -> np.ndarray | None:
        """Registration of distances (CTF only): translation of each distance onto the first, from mean images."""
        if len(self.entries) < 2:
            return None
        rows = slice(None)
        means = []
        few = np.arange(0, len(self.angles_rad), max(1, len(self.angles_rad) // 8))
        for e in self.entries:
            img = self._corrected(e, rows, few).mean(axis=0)
            if self.cone:
                img = _phase.rescale_to_pixel(img, e.pixel_size_m / self.pixel_size_m)
            means.append(img)
        return _phase.estimate_shifts(means[0], means)

    def _deringer(self, sinos_shape):
        p = self.params
        if p.ring_removal == "none":
            return None
        from nabu.reconstruction.rings import MunchDeringer, VoDeringer

        if p.ring_removal == "munch":
            import pywt

            # More levels than the sinogram supports only adds boundary effects (pywt warns).
            levels = max(1, min(p.munch_levels, pywt.dwt_max_level(min(sinos_shape[-2:]), p.munch_wavelet)))
            return MunchDeringer(sinos_shape, p.munch_sigma, levels=levels, wname=p.munch_wavelet)
        try:
            import algotom  # noqa: F401
        except ImportError as exc:
            raise ImportError("reconstruction.ring_removal = 'vo' needs the package 'algotom' (pip install algotom)") from exc
        return VoDeringer(sinos_shape)

    def _slab(self, z0: int, z1: int, center_offset_px: float, shifts) -> np.ndarray:
        r0, r1 = self.row_offset + z0, self.row_offset + z1
        if self.cone:
            a, b = 0, self.n_rows  # magnification changes rows: take the whole detector
        else:
            a, b = max(0, r0 - self.margin_rows), min(self.n_rows, r1 + self.margin_rows)
        retrieve = self._retriever((b - a, self.n_columns))
        n_proj = self.angles_rad.size
        sinos = np.empty((r1 - r0, n_proj, self.n_columns), np.float32)
        references = [(e.read(FLAT, slice(a, b)), e.read(DARK, slice(a, b))) for e in self.entries]
        # Projections in chunks: memory stays at a few frames of the slab, whatever the number of angles.
        for start in range(0, n_proj, PROJECTION_CHUNK):
            which = np.arange(start, min(start + PROJECTION_CHUNK, n_proj))
            images = [self._corrected(e, slice(a, b), which, ref) for e, ref in zip(self.entries, references)]
            if self.cone:
                for e, stack in zip(self.entries, images):
                    ratio = e.pixel_size_m / self.pixel_size_m
                    if not math.isclose(ratio, 1.0, rel_tol=1e-6):
                        stack[:] = np.stack([_phase.rescale_to_pixel(img, ratio) for img in stack])
            for n, i in enumerate(which):
                if self.params.phase_retrieval == "paganin":
                    proj = retrieve(images[0][n])
                else:
                    proj = retrieve(np.stack([stack[n] for stack in images]), translations_vh=None if shifts is None else -shifts)
                sinos[:, i, :] = proj[r0 - a : r1 - a]
        sinos /= np.float32(self.pixel_size_m)  # ∫δ in voxel units: FBP gives δ
        deringer = self._deringer(sinos.shape)
        if deringer is not None:
            sinos = deringer.remove_rings(np.ascontiguousarray(sinos))
        backend = make_backend(self.params.fbp_backend, self.n_columns, self.angles_rad, self.volume_shape[1:], center_offset_px=center_offset_px)
        return backend(sinos)

    # -- all ----------------------------------------------------------------------------------
    def run(self) -> ReconstructionResult:
        """Reconstruct the whole volume."""
        t0 = time.perf_counter()
        recorded = self.scan.reference.rotation_axis_offset_px
        estimated = self.estimate_center_offset()
        self.info["center_offset_estimated_px"] = estimated
        if recorded is not None:
            self.info["center_offset_file_px"] = recorded
            self.info["center_offset_error_px"] = estimated - recorded
        if self.params.rotation_axis == "file":
            if recorded is None:
                raise InputFileError(self.scan.path, f"dataset {self.scan.reference.entry}/instrument/detector/x_rotation_axis_pixel_position: "
                                     "missing but reconstruction.rotation_axis = 'file'")
            center = recorded
        else:
            center = estimated
        self.info["center_offset_used_px"] = center
        shifts = self._distance_shifts() if self.params.phase_retrieval == "ctf" else None
        if shifts is not None:
            self.info["distance_shifts_px"] = shifts.tolist()
        nz = self.volume_shape[0]
        step = self.params.slab_slices
        bounds = [(z, min(z + step, nz)) for z in range(0, nz, step)]
        delta = np.empty(self.volume_shape, np.float32)

        def work(bound):
            z0, z1 = bound
            delta[z0:z1] = self._slab(z0, z1, center, shifts)

        if self.workers == 1:
            for bound in bounds:
                work(bound)
        else:
            with ThreadPoolExecutor(self.workers) as pool:
                list(pool.map(work, bounds))
        volume = equalize(delta) if self.params.equalize_histogram else delta.copy()
        self.info["seconds"] = time.perf_counter() - t0
        return ReconstructionResult(delta=delta, volume=volume, voxel_size_um=self.pixel_size_m * 1e6, info=self.info)


def equalize(volume: np.ndarray, *, nbins: int = 256, slab: int = 32) -> np.ndarray:
    """Histogram equalization exactly as ``skimage.exposure.equalize_hist`` (global CDF), slab by slab, float32.

    ``equalize_hist`` itself promotes the whole volume to float64 at once; this
    applies the same ``cumulative_distribution`` and ``np.interp`` per slab to
    keep memory at the size of the output.
    """
    from skimage.exposure import cumulative_distribution

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # skimage guesses "color image" from a last axis of 3 or 4
        cdf, centers = cumulative_distribution(volume, nbins)
    out = np.empty(volume.shape, np.float32)
    for z in range(0, volume.shape[0], slab):
        out[z : z + slab] = np.interp(volume[z : z + slab], centers, cdf)
    return out


# Files ---------------------------------------------------------------------------------------


def write_volume(result: ReconstructionResult, out_dir: str | Path, *, attrs: dict | None = None) -> tuple[Path, Path]:
    """Write ``volume.nc`` (``delta``, ``volume``; coords in µm; attrs) and ``volume.tif`` (the equalized volume).

    Both files appear together or not at all (temporary names, renamed at the end).
    """
    import tifffile
    import xarray as xr

    from twin.io import NETCDF_ENGINE, atomic_path

    out_dir = Path(out_dir)
    v = result.voxel_size_um
    nz, ny, nx = result.delta.shape
    coords = {"z": ("z", np.arange(nz) * v, {"units": "µm"}), "y": ("y", np.arange(ny) * v, {"units": "µm"}),
              "x": ("x", np.arange(nx) * v, {"units": "µm"})}
    # netCDF attributes are scalars, strings or 1-D arrays: nested lists (per-distance shifts) are flattened
    info = {k: (np.asarray(val, dtype=float).ravel() if isinstance(val, list) else val) for k, val in result.info.items()}
    ds = xr.Dataset(
        {
            "delta": (("z", "y", "x"), result.delta, {"long_name": "refractive index decrement δ", "units": "1"}),
            "volume": (("z", "y", "x"), result.volume, {"long_name": "ring-corrected, histogram-equalized volume", "units": "1"}),
        },
        coords=coords,
        attrs={"voxel_size_um": v, **info, **(attrs or {})},
    )
    encoding = {name: {"compression": "gzip", "compression_opts": 1} for name in ("delta", "volume")}
    nc_path, tif_path = out_dir / "volume.nc", out_dir / "volume.tif"
    with atomic_path(nc_path) as nc_tmp, atomic_path(tif_path) as tif_tmp:
        ds.to_netcdf(nc_tmp, engine=NETCDF_ENGINE, encoding=encoding)
        tifffile.imwrite(tif_tmp, result.volume, imagej=True, resolution=(1.0 / v, 1.0 / v),
                         metadata={"spacing": v, "unit": "um", "axes": "ZYX"})
    return nc_path, tif_path


def reconstruct_file(path: str | Path, params: Reconstruction, *, expected_distances_m=None, volume_shape=None,
                     workers: int = 1) -> ReconstructionResult:
    """Open an NXtomo file and reconstruct it (see :class:`Reconstructor`)."""
    scan = open_scan(path, expected_distances_m=expected_distances_m)
    return Reconstructor(scan, params, volume_shape=volume_shape, workers=workers).run()


def compute_reconstruction(ctx) -> None:
    """Stage ``reconstruction`` (per scan): ``holograms[scan]/scan.nx`` → ``volume.nc``, ``volume.tif``.

    Reads the scenario's ``reconstruction`` section and ``beamline.propagation_distances_m``
    (checked against the file); ``run.workers`` sets the threads (not the result). The
    output grid is the phantom's, recorded in the file by the holograms stage.
    """
    sc = ctx.scenario
    if sc.oracle.true_delta:
        result = true_delta_result(Path(ctx.input("truth", ctx.item)) / "phantom.nc", sc.reconstruction)
    else:
        source = Path(ctx.input("holograms", ctx.item)) / "scan.nx"
        result = reconstruct_file(source, sc.reconstruction, expected_distances_m=sc.beamline.propagation_distances_m,
                                  workers=sc.run.workers)
    write_volume(result, ctx.out_dir, attrs={"scan": ctx.item or ""})


def true_delta_result(phantom_nc: Path, params: Reconstruction) -> ReconstructionResult:
    """The error budget's oracle reconstruction: the phantom's true δ, equalized as a reconstruction would be."""
    import xarray as xr

    from twin.io import NETCDF_ENGINE

    with xr.open_dataset(phantom_nc, engine=NETCDF_ENGINE) as truth:
        delta = truth["delta"].values.astype(np.float32)
        voxel_size_um = float(truth.attrs["voxel_size_um"])
    volume = equalize(delta) if params.equalize_histogram else delta.copy()
    return ReconstructionResult(delta=delta, volume=volume, voxel_size_um=voxel_size_um, info={"oracle": "true_delta"})
