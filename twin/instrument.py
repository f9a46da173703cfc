"""Forward model of ESRF ID16B holotomography: δ, β volumes → flat/dark/projection frames at each distance.

The chain for one projection angle θ (Cloetens et al., Appl. Phys. Lett. 75,
2912 (1999), doi:10.1063/1.125225; Martinez-Criado et al., J. Synchrotron
Rad. 23, 344 (2016), doi:10.1107/S1600577515019839):

1. line integrals ``∫δ dl`` and ``∫β dl`` along the beam through the volume
   (ASTRA; the rotation axis is the volume's z axis, so each z slice is an
   independent 2-D parallel-beam problem; CPU projector per slice, or one 3-D
   CUDA call when a GPU is present), with the phantom box embedded in a
   cylinder of each slice's mean material (see below);
2. optional sample jitter and rotation-axis offset (sub-pixel shifts);
3. exit wave ``ψ = exp(−k∫β − i k∫δ)``, ``k = 2π/λ``;
4. Fresnel propagation over each effective distance
   ``D = z₁z₂/(z₁+z₂)`` (Fresnel scaling theorem: the cone beam of a point
   focus at ``z₁`` upstream of the sample equals a parallel beam over ``D``,
   magnified by ``M = (z₁+z₂)/z₁``) — :class:`twin._fresnel.FresnelPropagator`;
5. partial coherence (focus size ``s``, blurring the sample plane by
   ``s z₂/(z₁+z₂)``) and detector PSF: one Gaussian blur of the intensity;
6. in ``cone`` mode, each distance resampled to its own pixel size
   ``p₀ M₀/Mᵢ`` (the detector pixel is fixed, the magnification is not);
7. detector: Poisson photon noise from flux × exposure × pixel area /
   beam area × LSO absorption efficiency (xraylib), pixel gain map, unstable
   pixels (gain differs between flats and projections → ring artefacts),
   smooth illumination non-uniformity, linear beam drift, dark current,
   camera offset and Gaussian read noise.

Every distance is written as one NXtomo entry (``entry0000`` ... in distance
order) of one HDF5 file per scan with ``nxtomo``, readable by nabu and tomwer;
the simulation parameters go in each entry's ``twin_simulation`` group. Steps
1–7 run a few angles at a time and the frames go to the file as they are made
(:func:`write_scan`), so the memory is the δ, β volumes plus one chunk of
images (``HOLOGRAM_CHUNK_BYTES``), whatever the number of projections.

The sample around the phantom: the phantom is a box cut out of a 1.1 mm
electrode disk. Ending it in vacuum would put a strong step at its faces,
which phase retrieval smears deep into a small volume; modelling the whole
disk would make the data truncated (local tomography, as at the beamline),
whose reconstruction carries a slice-dependent offset. The twin takes the
middle way: the box sits in a cylinder (radius: half the box diagonal plus a
margin of six Fresnel lengths √(λD)) of each slice's mean material, above and
below the sample continues as its end slices, and the detector is widened to
the cylinder's projected width, so the data are complete. Truncation is not
modelled (a stated simplification); the pipeline crops back to the phantom
grid.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.ndimage

from twin._fresnel import FresnelPropagator
from twin.errors import InputFileError
from twin.io import atomic_path
from twin.scenario import Scenario

log = logging.getLogger("twin.instrument")

LSO_DENSITY_G_CM3 = 7.4
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
#: Frame kinds of the NXtomo ``image_key`` (NeXus): 0 projection, 1 flat, 2 dark.
PROJECTION, FLAT, DARK = 0, 1, 2
#: Working images of the hologram simulation held at once (see :meth:`Instrument.angles_per_chunk`), bytes.
HOLOGRAM_CHUNK_BYTES = 1 << 30


def hologram_bytes_per_angle(n_distances: int, detector_pixels: int) -> int:
    """Working images of one projection angle while simulating: the two path stacks and, per distance, the
    intensities and the frames (float32), bytes."""
    return (2 + 2 * n_distances) * detector_pixels * 4


def wavelength_m(energy_kev: float) -> float:
    """X-ray wavelength λ = hc/E, m."""
    return 1.239841984e-6 / (energy_kev * 1e3)


def cone_geometry(effective_distance_m: float, focus_to_detector_m: float) -> tuple[float, float, float]:
    """Source–sample z₁, sample–detector z₂ and magnification M for an effective distance D = z₁z₂/(z₁+z₂).

    Solves ``z₁(L − z₁)/L = D`` with ``L = z₁ + z₂`` for the root with the sample
    near the focus (ID16B: the detector is fixed, the sample moves).

    Parameters
    ----------
    effective_distance_m : float
        Parallel-beam-equivalent propagation distance D, m.
    focus_to_detector_m : float
        L = z₁ + z₂, m; must exceed 4D.

    Returns
    -------
    z1_m, z2_m, magnification
    """
    L, D = focus_to_detector_m, effective_distance_m
    disc = L * L - 4.0 * D * L
    if disc <= 0:
        raise ValueError(f"effective distance {D} m needs focus_to_detector_m > 4 D = {4 * D} m, got {L}")
    z1 = 0.5 * (L - math.sqrt(disc))
    return z1, L - z1, L / z1


#: Mean count above which photon noise is drawn from the normal approximation of the Poisson law.
NORMAL_APPROXIMATION_MIN_COUNTS = 1000.0


def photon_counts(expected: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Poisson-distributed counts of mean ``expected`` (float32 out).

    Pixels with a mean of at least :data:`NORMAL_APPROXIMATION_MIN_COUNTS`
    are drawn as ``λ + √λ·N(0, 1)``: same mean and variance, skewness
    1/√λ ≤ 0.03 instead of 0, at a third of the time of numpy's Poisson
    sampler, which dominated the detector model (ID16B flats hold 10³-10⁵
    counts per pixel). Dimmer pixels are drawn exactly.
    """
    lam = np.maximum(np.asarray(expected, dtype=np.float32), 0.0)
    bright = lam >= NORMAL_APPROXIMATION_MIN_COUNTS
    if bright.all():
        return lam + np.sqrt(lam) * rng.standard_normal(lam.shape, dtype=np.float32)
    counts = np.empty(lam.shape, np.float32)
    counts[~bright] = rng.poisson(lam[~bright])  # each pixel drawn once, by its own law
    counts[bright] = lam[bright] + np.sqrt(lam[bright]) * rng.standard_normal(int(bright.sum()), dtype=np.float32)
    return counts


def scintillator_efficiency(energy_kev: float, thickness_um: float) -> float:
    """Fraction of photons absorbed in an LSO (Lu₂SiO₅) scintillator: ``1 − exp(−μ t)``, μ from xraylib."""
    import xraylib

    mu_per_cm = xraylib.CS_Total_CP("Lu2SiO5", energy_kev) * LSO_DENSITY_G_CM3
    return 1.0 - math.exp(-mu_per_cm * thickness_um * 1e-4)


# Line integrals ------------------------------------------------------------------------------


class LineIntegrals:
    """Parallel-beam line integrals of (z, y, x) volumes about the z axis, with ASTRA.

    Parameters
    ----------
    volume_shape : tuple of int
        ``(nz, ny, nx)`` voxels.
    n_columns : int
        Detector columns (pixel = one voxel).
    angles_rad : array
        Projection angles, rad.
    use_cuda : bool or None
        ``None``: CUDA when ASTRA sees a GPU, else the CPU projector slice by slice.

    Notes
    -----
    ASTRA's convention (checked in the tests): at angle θ the detector
    coordinate of voxel (row, col) is ``u = x cos θ + y sin θ`` with
    ``x = col − (nx−1)/2`` and ``y = (ny−1)/2 − row``. The result is in voxel
    units (multiply by the voxel size for metres).
    """

    def __init__(self, volume_shape, n_columns: int, angles_rad, *, use_cuda: bool | None = None):
        import astra

        self._astra = astra
        self.volume_shape = tuple(int(n) for n in volume_shape)
        self.n_columns = int(n_columns)
        self.angles_rad = np.asarray(angles_rad, dtype=float)
        self.use_cuda = astra.use_cuda() if use_cuda is None else bool(use_cuda)
        nz, ny, nx = self.volume_shape
        if self.use_cuda:
            self._vol_geom = astra.create_vol_geom(ny, nx, nz)
            self._proj_geom = astra.create_proj_geom("parallel3d", 1.0, 1.0, nz, self.n_columns, self.angles_rad)
        else:
            self._vol_geom = astra.create_vol_geom(ny, nx)
            self._proj_geom = astra.create_proj_geom("parallel", 1.0, self.n_columns, self.angles_rad)
            self._projector = astra.create_projector("linear", self._proj_geom, self._vol_geom)

    def __call__(self, volume: np.ndarray) -> np.ndarray:
        """Line integrals, voxel units, shape ``(nz, n_angles, n_columns)`` (ASTRA's sinogram stack order)."""
        astra = self._astra
        volume = np.ascontiguousarray(volume, dtype=np.float32)
        if volume.shape != self.volume_shape:
            raise ValueError(f"volume: expected shape {self.volume_shape}, got {volume.shape}")
        if self.use_cuda:
            sid, data = astra.create_sino3d_gpu(volume, self._proj_geom, self._vol_geom)
            astra.data3d.delete(sid)
            return data
        out = np.empty((volume.shape[0], self.angles_rad.size, self.n_columns), dtype=np.float32)
        for iz in range(volume.shape[0]):
            if not volume[iz].any():
                out[iz] = 0.0
                continue
            sid, out[iz] = astra.create_sino(volume[iz], self._projector)
            astra.data2d.delete(sid)
        return out

    def close(self) -> None:
        if not self.use_cuda:
            self._astra.projector.delete(self._projector)


# The instrument --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """Detector and scan geometry of one simulated scan (sample-plane units)."""

    volume_shape: tuple[int, int, int]
    n_rows: int
    n_columns: int
    row_offset: int
    column_offset: int
    pixel_size_m: float
    angles_deg: np.ndarray
    distances_m: tuple[float, ...]
    z1_m: tuple[float, ...]
    z2_m: tuple[float, ...]
    magnifications: tuple[float, ...]


class Instrument:
    """ID16B holotomography forward model for one scenario.

    Builds the geometry and Fresnel kernels once; call :func:`write_scan` (streamed to
    disk) or :meth:`simulate` (in memory) for each scan's δ, β volumes.

    Parameters
    ----------
    scenario : Scenario
        Reads ``beamline.*``, ``sample.voxel_size_um`` and ``oracle.noise_free_holograms``
        (expected counts instead of Poisson draws, no read noise: the error budget's oracle).
    volume_shape : tuple of int, optional
        ``(nz, ny, nx)``; default ``scenario.volume_shape``.

    Examples
    --------
    >>> from twin.scenario import load_scenario
    >>> sc = load_scenario("tiny", ["beamline.n_projections=8", "beamline.n_flats=2", "beamline.n_darks=2"])
    >>> inst = Instrument(sc, volume_shape=(8, 16, 16))
    >>> delta = np.full((8, 16, 16), 5e-7, np.float32); beta = delta / 477
    >>> frames = inst.simulate(delta, beta, rng=np.random.default_rng(0))
    >>> len(frames), frames[0]["data"].shape[0]
    (4, 12)
    """

    def __init__(self, scenario: Scenario, volume_shape: tuple[int, int, int] | None = None):
        self.scenario = scenario
        b = scenario.beamline
        self.volume_shape = tuple(volume_shape or scenario.volume_shape)
        nz, ny, nx = self.volume_shape
        self.pixel_size_m = scenario.sample.voxel_size_um * 1e-6
        self.wavelength_m = wavelength_m(b.energy_kev)
        distances = tuple(float(d) for d in b.propagation_distances_m)
        # Fresnel fringes and phase-retrieval kernels spread over a few √(λD): keep them clear of the
        # phantom (inside the surrounding cylinder) and of the detector edge.
        margin = int(math.ceil(6.0 * math.sqrt(self.wavelength_m * max(distances)) / self.pixel_size_m)) + 2
        self.cylinder_radius_px = math.hypot(ny, nx) / 2 + margin
        n_columns = max(b.detector_pixels, int(math.ceil(2 * self.cylinder_radius_px)) + 2 * margin)
        n_columns += n_columns % 2
        n_rows = nz + 2 * margin
        cones = [cone_geometry(d, b.focus_to_detector_m) for d in distances]
        self.geometry = Geometry(
            volume_shape=self.volume_shape,
            n_rows=n_rows,
            n_columns=n_columns,
            row_offset=margin,
            column_offset=(n_columns - nx) // 2,
            pixel_size_m=self.pixel_size_m,
            angles_deg=np.linspace(0.0, b.angular_range_deg, b.n_projections, endpoint=False),
            distances_m=distances,
            z1_m=tuple(c[0] for c in cones),
            z2_m=tuple(c[1] for c in cones),
            magnifications=tuple(c[2] for c in cones),
        )
        self.propagators = [
            FresnelPropagator((n_rows, n_columns), pixel_size_m=self.pixel_size_m, wavelength_m=self.wavelength_m, distance_m=d)
            for d in distances
        ]
        # Source blur in the sample plane s z2/(z1+z2), and the detector PSF, add in quadrature.
        self.blur_sigma_px = [
            math.hypot(b.source_size_fwhm_um * z2 / (z1 + z2), b.detector_psf_fwhm_um) * 1e-6 / FWHM_PER_SIGMA / self.pixel_size_m
            for z1, z2, _ in cones
        ]
        binning = (scenario.sample.voxel_size_um / b.native_pixel_size_um) ** 2
        self.binning = binning
        self.efficiency = scintillator_efficiency(b.energy_kev, b.scintillator_thickness_um)
        self.photons_per_pixel = b.flux_photons_per_s * b.exposure_s * (scenario.sample.voxel_size_um / b.beam_width_um) ** 2
        self.read_noise_counts = b.read_noise_e * math.sqrt(binning)
        self.dark_counts = b.dark_current_e_per_s * b.exposure_s * binning

    # -- physics pieces -----------------------------------------------------------------------
    def line_integrals(self, delta: np.ndarray, beta: np.ndarray, angles: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """``∫δ dl`` and ``∫β dl`` in metres on the detector grid, shape ``(n_angles, n_rows, n_columns)``,
        at the scan's angles ``angles`` (a slice of them; default all)."""
        g = self.geometry
        angles_rad = np.deg2rad(g.angles_deg[angles])
        projector = LineIntegrals(self.volume_shape, g.n_columns, angles_rad)
        try:
            # The phantom box is embedded in a cylinder of the slice's mean material (chord of the cylinder
            # minus chord of the box): no step at the box's faces, and the projections end inside the detector.
            one_slice = LineIntegrals((1,) + self.volume_shape[1:], g.n_columns, angles_rad)
            box = one_slice(np.ones((1,) + self.volume_shape[1:], np.float32))  # (1, angles, cols): same for every slice
            one_slice.close()
            radius_vox = self.cylinder_radius_px
            u = np.arange(g.n_columns) - (g.n_columns - 1) / 2
            outside = np.maximum(2 * np.sqrt(np.maximum(radius_vox**2 - u**2, 0))[None, None, :] - box, 0.0)
            out = []
            for vol in (delta, beta):
                sino = projector(vol)  # (nz, angles, cols)
                sino += vol.mean(axis=(1, 2), dtype=np.float64).astype(np.float32)[:, None, None] * outside
                proj = np.zeros((angles_rad.size, g.n_rows, g.n_columns), np.float32)
                top, bottom = g.row_offset, g.row_offset + self.volume_shape[0]
                proj[:, top:bottom, :] = sino.transpose(1, 0, 2)
                # The cell continues above and below the phantom: repeat its end slices into the margin rows
                # rather than ending the sample in a step that phase retrieval would smear into the volume.
                proj[:, :top, :] = proj[:, top : top + 1, :]
                proj[:, bottom:, :] = proj[:, bottom - 1 : bottom, :]
                proj *= self.pixel_size_m
                out.append(proj)
        finally:
            projector.close()
        return out[0], out[1]

    def holograms(self, delta_path_m: np.ndarray, beta_path_m: np.ndarray, *, workers: int = 1) -> list[np.ndarray]:
        """Noise-free, flat-normalized intensities ``(n_angles, rows, cols)`` per distance (blur included)."""
        k = 2.0 * math.pi / self.wavelength_m
        stacks = [np.empty(delta_path_m.shape, np.float32) for _ in self.propagators]
        for i in range(delta_path_m.shape[0]):
            # single precision: phases of a few hundred rad keep ~1e-5 rad accuracy, and the FFTs run twice as fast
            wave = np.exp(-k * beta_path_m[i] - 1j * k * delta_path_m[i]).astype(np.complex64)
            spectrum = self.propagators[0].spectrum(wave, workers=workers)  # one exit wave, one transform, every distance
            for stack, propagator, sigma_px in zip(stacks, self.propagators, self.blur_sigma_px):
                intensity = np.abs(propagator.from_spectrum(spectrum, workers=workers)) ** 2
                if sigma_px > 0:
                    intensity = scipy.ndimage.gaussian_filter(intensity, sigma_px, mode="nearest")
                stack[i] = intensity
        if self.scenario.beamline.magnification_mode == "cone":
            stacks = [self._to_own_magnification(stack, self.geometry.magnifications[0] / mag)
                      for stack, mag in zip(stacks, self.geometry.magnifications)]
        return stacks

    @staticmethod
    def _to_own_magnification(stack: np.ndarray, pixel_ratio: float) -> np.ndarray:
        """Resample images so one output pixel spans ``pixel_ratio`` input pixels, about the centre (cone mode)."""
        rows, cols = stack.shape[-2:]
        centre = np.array([(rows - 1) / 2, (cols - 1) / 2])
        matrix = np.full(2, pixel_ratio)
        offset = centre - matrix * centre
        return np.stack(
            [scipy.ndimage.affine_transform(img, matrix, offset=offset, order=1, mode="nearest") for img in stack]
        ).astype(np.float32)

    def projection_shifts(self, rng: np.random.Generator) -> np.ndarray | None:
        """(n_projections, 2) sub-pixel shifts (rows, columns): rotation-axis offset and random jitter; None if none."""
        b = self.scenario.beamline
        shifts = np.zeros((b.n_projections, 2))
        shifts[:, 1] = b.rotation_axis_offset_px
        if b.jitter_sigma_px > 0:
            shifts += rng.normal(0.0, b.jitter_sigma_px, size=shifts.shape)
        return shifts if np.any(shifts) else None

    @staticmethod
    def shift_projections(paths: tuple[np.ndarray, np.ndarray], shifts: np.ndarray | None) -> None:
        """Shift each projection of ``paths`` by its row of ``shifts`` (linear interpolation), in place."""
        if shifts is None:
            return
        for arr in paths:
            for i in range(arr.shape[0]):
                arr[i] = scipy.ndimage.shift(arr[i], shifts[i], order=1, mode="nearest")

    def frame_layout(self) -> dict[str, np.ndarray]:
        """``image_key``, ``rotation_angle_deg`` and ``count_time_s`` of the frames of one distance, in
        acquisition order: darks, half the flats, projections, the other flats."""
        b, g = self.scenario.beamline, self.geometry
        n_flat_before = b.n_flats // 2 + b.n_flats % 2
        keys = np.concatenate([np.full(b.n_darks, DARK), np.full(n_flat_before, FLAT), np.full(b.n_projections, PROJECTION),
                               np.full(b.n_flats - n_flat_before, FLAT)]).astype(np.uint8)
        angles = np.concatenate([np.zeros(b.n_darks), np.full(n_flat_before, g.angles_deg[0]), g.angles_deg,
                                 np.full(b.n_flats - n_flat_before, g.angles_deg[-1])])
        return {"image_key": keys, "rotation_angle_deg": angles, "count_time_s": np.full(keys.size, b.exposure_s)}

    def angles_per_chunk(self) -> int:
        """Projection angles simulated at once: as many as fit ``HOLOGRAM_CHUNK_BYTES`` of working images (the
        two path stacks, and per distance its intensities and frames), at least one."""
        per_angle = hologram_bytes_per_angle(len(self.propagators), self.geometry.n_rows * self.geometry.n_columns)
        return int(min(self.scenario.beamline.n_projections, max(1, HOLOGRAM_CHUNK_BYTES // per_angle)))

    def frame_chunks(self, delta: np.ndarray, beta: np.ndarray, *, rng: np.random.Generator,
                     angles_per_chunk: int | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
        """The frames of one scan, a few angles at a time: yields ``(distance index, first frame, frames)``.

        ``frames`` is ``(k, rows, cols)`` float32 counts, frames ``first … first + k − 1`` of that distance in
        :meth:`frame_layout`'s order. Memory beyond δ and β: about :meth:`angles_per_chunk` angles' images
        (``HOLOGRAM_CHUNK_BYTES``), whatever the number of projections. Randomness: the projection shifts from
        ``rng``, then each distance's detector from its own generator spawned from ``rng``, drawn frame by frame
        in acquisition order, so the frames do not depend on ``angles_per_chunk`` (tested).
        """
        for name, arr in (("delta", delta), ("beta", beta)):
            if arr.shape != self.volume_shape:
                raise ValueError(f"{name}: expected shape {self.volume_shape}, got {arr.shape}")
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"{name}: contains NaN or infinite values")
        keys = self.frame_layout()["image_key"]
        n_proj = self.scenario.beamline.n_projections
        first_projection = int(np.flatnonzero(keys == PROJECTION)[0])
        after = first_projection + n_proj
        step = angles_per_chunk or self.angles_per_chunk()
        shifts = self.projection_shifts(rng)
        detectors = [_Detector(self, generator, keys) for generator in rng.spawn(len(self.propagators))]
        for d, det in enumerate(detectors):
            yield d, 0, det.frames(0, first_projection)
        for start in range(0, n_proj, step):
            chunk = slice(start, min(start + step, n_proj))
            paths = self.line_integrals(delta, beta, chunk)
            self.shift_projections(paths, None if shifts is None else shifts[chunk])
            stacks = self.holograms(*paths)
            del paths
            for d, (det, stack) in enumerate(zip(detectors, stacks)):
                yield d, first_projection + chunk.start, det.frames(first_projection + chunk.start,
                                                                     first_projection + chunk.stop, stack)
        for d, det in enumerate(detectors):
            yield d, after, det.frames(after, keys.size)

    def simulate(self, delta: np.ndarray, beta: np.ndarray, *, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
        """All frames of one scan in memory: per distance, :meth:`frame_layout` and ``data`` (frames, rows, cols).

        For small scans and tests; the ``holograms`` stage streams the same frames to disk (:func:`write_scan`).
        """
        layout = self.frame_layout()
        g = self.geometry
        out = [dict(layout, data=np.empty((layout["image_key"].size, g.n_rows, g.n_columns), np.float32))
               for _ in self.propagators]
        for d, first, frames in self.frame_chunks(delta, beta, rng=rng):
            out[d]["data"][first:first + len(frames)] = frames
        return out

    # -- metadata -------------------------------------------------------------------------------
    def parameters(self) -> dict:
        """Everything needed to interpret (or redo) the simulation, as plain JSON data."""
        g = self.geometry
        return {
            "beamline": self.scenario.beamline.model_dump(mode="json"),
            "voxel_size_um": self.scenario.sample.voxel_size_um,
            "volume_shape": list(g.volume_shape),
            "row_offset": g.row_offset,
            "column_offset": g.column_offset,
            "wavelength_m": self.wavelength_m,
            "z1_m": list(g.z1_m),
            "z2_m": list(g.z2_m),
            "magnifications": list(g.magnifications),
            "blur_sigma_px": list(self.blur_sigma_px),
            "scintillator_efficiency": self.efficiency,
            "photons_per_pixel": self.photons_per_pixel,
            "binning": self.binning,
            "fresnel_numbers": [p.fresnel_number for p in self.propagators],
            "noise_free": self.scenario.oracle.noise_free_holograms,
        }


class _Detector:
    """One distance's detector for one scan: its fixed pattern (gain, unstable pixels, illumination profile) and
    its noise, drawn from its own generator frame by frame in acquisition order."""

    def __init__(self, instrument: Instrument, rng: np.random.Generator, keys: np.ndarray):
        b = instrument.scenario.beamline
        self.instrument, self.rng, self.keys = instrument, rng, keys
        shape = (instrument.geometry.n_rows, instrument.geometry.n_columns)
        self.shape = shape
        # float32 maps: the frames are float32, and float64 arithmetic on every frame doubled the detector's time
        self.gain = (1.0 + b.gain_sigma * rng.standard_normal(shape)).astype(np.float32)
        unstable = rng.random(shape) < b.unstable_pixel_fraction
        self.gain_projection = self.gain * np.where(
            unstable, 1.0 + b.unstable_pixel_gain_change * rng.choice([-1.0, 1.0], size=shape), 1.0).astype(np.float32)
        self.profile = (1.0 + b.illumination_nonuniformity
                        * _smooth_field(shape, correlation_px=max(shape) / 4, rng=rng)).astype(np.float32)

    def frames(self, first: int, stop: int, intensities: np.ndarray | None = None) -> np.ndarray:
        """Recorded counts of frames ``first … stop − 1`` (float32); ``intensities``: the flat-normalized
        holograms of the projections among them, in order."""
        inst, b, rng, shape = self.instrument, self.instrument.scenario.beamline, self.rng, self.shape
        mean_photons = inst.photons_per_pixel * inst.efficiency
        n_lit = max(self.keys.size - b.n_darks - 1, 1)
        noise_free = inst.scenario.oracle.noise_free_holograms
        out = np.empty((stop - first,) + shape, np.float32)
        i_proj = 0
        for j, i in enumerate(range(first, stop)):
            if noise_free:
                dark = np.full(shape, inst.dark_counts + b.dark_offset_counts)
            else:
                dark = (rng.poisson(inst.dark_counts, size=shape).astype(np.float32) + np.float32(b.dark_offset_counts)
                        + np.float32(inst.read_noise_counts) * rng.standard_normal(shape, dtype=np.float32))
            if self.keys[i] == DARK:
                out[j] = dark
                continue
            drift = 1.0 + b.beam_drift_fraction * (i - b.n_darks) / n_lit
            expected = np.float32(mean_photons * drift) * self.profile
            if self.keys[i] == PROJECTION:
                expected = expected * intensities[i_proj]
                i_proj += 1
                gain = self.gain_projection
            else:
                gain = self.gain
            counts = np.maximum(expected, 0.0) if noise_free else photon_counts(expected, rng)
            out[j] = gain * counts + dark
        return out


def _smooth_field(shape, *, correlation_px: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth random field of unit standard deviation (Gaussian-filtered white noise)."""
    field = scipy.ndimage.gaussian_filter(rng.standard_normal(shape), correlation_px, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-12)


def pixel_size_of_distance(geometry: Geometry, index: int, mode: str) -> float:
    """Sample-plane pixel size of distance ``index``, m: the voxel size, or ``p₀ M₀/Mᵢ`` in cone mode."""
    if mode == "cone":
        return geometry.pixel_size_m * geometry.magnifications[0] / geometry.magnifications[index]
    return geometry.pixel_size_m


# Files -------------------------------------------------------------------------------------------


def write_nxtomo(path: str | Path, instrument: Instrument, frames: list[dict[str, np.ndarray]], *, title: str = "") -> Path:
    """Write frames held in memory (:meth:`Instrument.simulate`) as an NXtomo file; see :func:`write_scan`."""
    return _write_entries(path, instrument, frames, ((d, 0, fr["data"]) for d, fr in enumerate(frames)), title=title)


def write_scan(path: str | Path, instrument: Instrument, delta: np.ndarray, beta: np.ndarray, *,
               rng: np.random.Generator, title: str = "") -> Path:
    """Simulate one scan and write it as an NXtomo HDF5 file, a few angles at a time (:meth:`Instrument.frame_chunks`),
    so memory stays bounded by δ, β and one chunk whatever the number of projections. Atomic.

    Entry ``entryNNNN`` holds distance N: detector data, image keys, angles,
    sample-plane pixel size, effective propagation distance
    (``sample/propagation_distance``), sample–detector distance, source–sample
    distance, energy, the rotation axis position, and a ``twin_simulation``
    group with the parameters as JSON.
    """
    layouts = [instrument.frame_layout() for _ in instrument.propagators]
    return _write_entries(path, instrument, layouts, instrument.frame_chunks(delta, beta, rng=rng), title=title)


def _write_entries(path: str | Path, instrument: Instrument, layouts: list[dict[str, np.ndarray]],
                   chunks: Iterable[tuple[int, int, np.ndarray]], *, title: str = "") -> Path:
    """One NXtomo entry per distance: metadata by ``nxtomo``, then the detector data filled chunk by chunk."""
    import h5py
    from nxtomo.application.nxtomo import NXtomo
    from pint import get_application_registry

    ureg = get_application_registry()
    g = instrument.geometry
    b = instrument.scenario.beamline
    params = json.dumps(instrument.parameters())
    with atomic_path(path) as tmp:
        for i, layout in enumerate(layouts):
            nx = NXtomo()
            nx.title = title or f"twin holotomography distance {i}"
            nx.instrument.beam.incident_energy = b.energy_kev * ureg.keV
            det = nx.instrument.detector
            # a placeholder of the right frame count: the data are written below, without holding the stack
            det.data = np.zeros((layout["image_key"].size, 1, 1), np.float32)
            det.image_key_control = layout["image_key"]
            det.count_time = layout["count_time_s"] * ureg.s
            pixel = pixel_size_of_distance(g, i, b.magnification_mode)
            det.x_pixel_size = pixel * ureg.m
            det.y_pixel_size = pixel * ureg.m
            det.distance = g.z2_m[i] * ureg.m
            det.x_rotation_axis_pixel_position = float(b.rotation_axis_offset_px)
            nx.instrument.source.distance = g.z1_m[i] * ureg.m
            nx.sample.rotation_angle = layout["rotation_angle_deg"] * ureg.degree
            nx.sample.propagation_distance = g.distances_m[i] * ureg.m
            nx.sample.x_pixel_size = pixel * ureg.m
            nx.sample.y_pixel_size = pixel * ureg.m
            nx.save(str(tmp), data_path=f"entry{i:04d}", overwrite=True)
        with h5py.File(tmp, "a") as f:
            datasets = []
            for i, layout in enumerate(layouts):
                entry = f[f"entry{i:04d}"]
                detector = entry["instrument/detector"]
                attrs = dict(detector["data"].attrs)
                del detector["data"]  # entry/data/data is a soft link to this path: it follows the new dataset
                data = detector.create_dataset("data", shape=(layout["image_key"].size, g.n_rows, g.n_columns),
                                               dtype=np.float32, chunks=(1, g.n_rows, g.n_columns))
                data.attrs.update(attrs)
                datasets.append(data)
                grp = entry.create_group("twin_simulation")
                grp.attrs["NX_class"] = "NXcollection"
                grp.create_dataset("parameters_json", data=params)
                grp.create_dataset("distance_index", data=i)
            written = [0] * len(layouts)
            for d, first, frames in chunks:
                datasets[d][first:first + len(frames)] = frames
                written[d] += len(frames)
            if written != [len(ds) for ds in datasets]:
                raise ValueError(f"{path}: frames written per distance {written}, expected {[len(ds) for ds in datasets]}")
    return Path(path)


# Stage -------------------------------------------------------------------------------------------


def compute_holograms(ctx) -> None:
    """Stage ``holograms`` (per scan): ``truth[scan]/phantom.nc`` → ``scan.nx``.

    Reads the scenario's ``beamline`` section and ``sample.voxel_size_um``;
    randomness (noise, detector defects, jitter) from ``ctx.rng``.
    """
    import xarray as xr

    source = Path(ctx.input("truth", ctx.item)) / "phantom.nc"
    try:
        with xr.open_dataset(source, engine="h5netcdf") as ds:
            delta = np.asarray(ds["delta"].values, dtype=np.float32)
            beta = np.asarray(ds["beta"].values, dtype=np.float32)
    except (OSError, KeyError, ValueError) as exc:
        raise InputFileError(source, f"cannot read variables 'delta' and 'beta' ({exc})") from None
    instrument = Instrument(ctx.scenario, volume_shape=delta.shape)
    write_scan(Path(ctx.out_dir) / "scan.nx", instrument, delta, beta, rng=ctx.rng, title=f"twin {ctx.scenario.name} {ctx.item}")
