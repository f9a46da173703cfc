"""Filtered backprojection behind a small backend interface.

Backends (``reconstruction.fbp_backend``):

``astra``       nabu's ``SinoFilter`` (Ram-Lak) then ASTRA's CPU ``BP``, slice by
                slice — the default on CPU;
``astra_cuda``  the same filter then ASTRA ``BP_CUDA`` — the default when ASTRA
                sees a GPU;
``tomopy``      tomopy ``gridrec`` (Ram-Lak), when tomopy is importable;
``numpy``       the reference written here: Ram-Lak filter with the
                spatial-domain kernel of Kak & Slaney (ch. 3), linear
                interpolation backprojection; slow, used in tests.

nabu is not used for backprojection: its FBP needs CUDA or OpenCL (it has no
CPU backprojector). Every backend takes sinograms ``(n_slices, n_angles,
n_columns)`` in voxel units and returns slices ``(n_slices, ny, nx)`` on a
grid centred on the rotation axis, which sits at column
``(n_columns − 1)/2 + center_offset_px``. Geometry convention (ASTRA's): at
angle θ voxel (row, col) projects to ``u = x cos θ + y sin θ``,
``x = col − (nx − 1)/2``, ``y = (ny − 1)/2 − row``.
"""

from __future__ import annotations

import abc

import numpy as np
import scipy.fft

BACKENDS = ("astra", "astra_cuda", "tomopy", "numpy")


class FBPBackend(abc.ABC):
    """Filtered backprojection of parallel-beam sinograms.

    Parameters
    ----------
    n_columns : int
        Detector columns.
    angles_rad : array
        Projection angles, rad (any range; 360° scans are handled).
    output_shape : (ny, nx)
        Reconstructed slice shape, voxels (one voxel = one detector pixel).
    center_offset_px : float
        Rotation axis minus the detector centre, pixels.
    """

    name = "base"

    def __init__(self, n_columns: int, angles_rad, output_shape, *, center_offset_px: float = 0.0):
        self.n_columns = int(n_columns)
        self.angles_rad = np.asarray(angles_rad, dtype=float)
        self.output_shape = tuple(int(n) for n in output_shape)
        self.center_offset_px = float(center_offset_px)

    #: Sinograms whose edge columns exceed this fraction of their maximum are treated as truncated.
    truncation_threshold = 1e-3

    def _axis_centred(self, sinos: np.ndarray) -> tuple[np.ndarray, bool]:
        """Shift the columns so that the rotation axis lands on the centre (Fourier shift); say whether they are truncated.

        Truncated projections (a sample wider than the field, as at the
        beamline) do not fall to zero at the detector edges: a ramp filter on
        zero-padded data would see a step there and cup the reconstruction, so
        they are edge-padded for filtering.
        """
        sinos = np.asarray(sinos, dtype=np.float32)
        if sinos.ndim != 3 or sinos.shape[1:] != (self.angles_rad.size, self.n_columns):
            raise ValueError(f"sinos: expected (n, {self.angles_rad.size}, {self.n_columns}), got {sinos.shape}")
        if abs(self.center_offset_px) > 1e-3:
            sinos = shift_columns(sinos, -self.center_offset_px)
        edges = np.abs(sinos[..., [0, -1]]).max() if sinos.size else 0.0
        return sinos, bool(edges > self.truncation_threshold * max(float(np.abs(sinos).max()), 1e-30))

    def _centred(self, sinos: np.ndarray) -> tuple[np.ndarray, int]:
        """:meth:`_axis_centred`, truncated sinograms edge-padded by half their width on each side, for backends
        that filter internally. Returns the sinograms and the padding added on each side."""
        sinos, truncated = self._axis_centred(sinos)
        pad = self.n_columns // 2 if truncated else 0
        return (np.pad(sinos, ((0, 0), (0, 0), (pad, pad)), mode="edge") if pad else sinos), pad

    @abc.abstractmethod
    def __call__(self, sinos: np.ndarray) -> np.ndarray:
        """Sinograms (n, angles, cols) → slices (n, ny, nx), float32."""


class AstraFBP(FBPBackend):
    """nabu's Ram-Lak ``SinoFilter`` then ASTRA's CPU backprojection ``BP`` × π/n_angles, slice by slice.

    The filter pads each row itself (to the power of two >= twice its width;
    with its edge values when the projections are truncated, else with zeros)
    and crops the filtered rows back, so only the detector's own columns are
    backprojected. Backprojecting edge-padded columns (ASTRA's ``FBP`` of a
    padded sinogram, this backend's former way) costs 1.4-1.6 times as much
    (ASTRA's CPU backprojector is ray-driven) and changes only voxels outside
    the detector's field: inside it, on a truncated disk, both are as far
    from the truth (rms 0.20 and 0.19 of a unit density; they differ by the
    padding length of the filter). Complete projections give ASTRA's ``FBP``
    (Shepp-Logan rms 0.029 from the phantom either way).
    """

    name = "astra"
    _algorithm = "BP"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        import astra

        self._astra = astra
        ny, nx = self.output_shape
        self._vol_geom = astra.create_vol_geom(ny, nx)

    def __call__(self, sinos):
        from nabu.reconstruction.filtering import SinoFilter

        astra = self._astra
        sinos, truncated = self._axis_centred(sinos)
        # one sinogram at a time: the padded spectra of a whole slab would outweigh the slab
        ramp = SinoFilter(sinos.shape[1:], filter_name="ramlak", padding_mode="edge" if truncated else "zeros",
                          extra_options={"fft_threads": 1})  # slabs run in parallel threads already
        scale = np.float32(np.pi / self.angles_rad.size)  # (π/N) Σ_θ over [0, π) or [0, 2π), as NumpyFBP
        proj_geom = astra.create_proj_geom("parallel", 1.0, sinos.shape[-1], self.angles_rad)
        projector = None if self._algorithm.endswith("CUDA") else astra.create_projector("linear", proj_geom, self._vol_geom)
        out = np.empty((sinos.shape[0],) + self.output_shape, np.float32)
        rec_id = astra.data2d.create("-vol", self._vol_geom)
        sino_id = astra.data2d.create("-sino", proj_geom)
        cfg = astra.astra_dict(self._algorithm)
        cfg["ReconstructionDataId"] = rec_id
        cfg["ProjectionDataId"] = sino_id
        if projector is not None:
            cfg["ProjectorId"] = projector
        alg_id = astra.algorithm.create(cfg)
        try:
            for i, sino in enumerate(sinos):
                astra.data2d.store(sino_id, ramp.filter_sino(sino) * scale)
                astra.algorithm.run(alg_id)
                out[i] = astra.data2d.get_shared(rec_id)
        finally:
            astra.algorithm.delete(alg_id)
            astra.data2d.delete([rec_id, sino_id])
            if projector is not None:
                astra.projector.delete(projector)
        return out


class AstraCudaFBP(AstraFBP):
    """The same filter, then ASTRA ``BP_CUDA`` (same interface and results as :class:`AstraFBP`, on the GPU)."""

    name = "astra_cuda"
    _algorithm = "BP_CUDA"

    def __init__(self, *args, **kwargs):
        import astra

        if not astra.use_cuda():
            raise ImportError("fbp_backend 'astra_cuda': ASTRA sees no CUDA GPU on this machine (astra.use_cuda() is False)")
        super().__init__(*args, **kwargs)


class TomopyFBP(FBPBackend):
    """tomopy ``gridrec`` with the Ram-Lak (``ramlak``) filter."""

    name = "tomopy"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        try:
            import tomopy
        except ImportError as exc:
            raise ImportError("fbp_backend 'tomopy' needs the package 'tomopy' (conda install -c conda-forge tomopy)") from exc
        self._tomopy = tomopy

    def __call__(self, sinos):
        sinos, _ = self._centred(sinos)
        # tomopy wants (angles, slices, columns) and reconstructs n_columns² slices centred on `center`.
        rec = self._tomopy.recon(
            np.ascontiguousarray(sinos.transpose(1, 0, 2)), self.angles_rad, center=(sinos.shape[-1] - 1) / 2.0,
            algorithm="gridrec", filter_name="ramlak", ncore=1,
        )
        rec = _crop_centre(rec, self.output_shape)
        return rec.astype(np.float32)


class NumpyFBP(FBPBackend):
    """Reference FBP in NumPy: Ram-Lak filter (spatial-domain kernel), linear-interpolation backprojection.

    Notes
    -----
    Filter: the band-limited ramp of Kak & Slaney (*Principles of Computerized
    Tomographic Imaging*, 1988, eq. 3.61): ``h[0] = 1/4``, ``h[n odd] = −1/(πn)²``,
    ``h[n even ≠ 0] = 0``, applied by FFT on a sinogram zero-padded to ≥ 2n.
    Backprojection: ``f(x, y) = (π/N) Σ_θ q_θ(x cos θ + y sin θ)`` over N
    equispaced angles in [0, π) or [0, 2π) (the latter averages both views of each ray).
    """

    name = "numpy"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        ny, nx = self.output_shape
        self._x = np.arange(nx) - (nx - 1) / 2.0
        self._y = (ny - 1) / 2.0 - np.arange(ny)

    @staticmethod
    def ram_lak(n_padded: int) -> np.ndarray:
        """Frequency response of the Kak–Slaney spatial Ram-Lak kernel on ``n_padded`` samples."""
        k = np.arange(n_padded)
        k = np.where(k > n_padded // 2, k - n_padded, k)
        h = np.zeros(n_padded)
        h[0] = 0.25
        odd = k % 2 == 1
        h[odd] = -1.0 / (np.pi * k[odd]) ** 2
        return np.real(scipy.fft.fft(h))

    def __call__(self, sinos):
        sinos, _ = self._centred(sinos)
        n = sinos.shape[-1]
        n_padded = scipy.fft.next_fast_len(2 * n)
        spectrum = scipy.fft.fft(sinos, n=n_padded, axis=-1)
        filtered = np.real(scipy.fft.ifft(spectrum * self.ram_lak(n_padded), axis=-1))[..., :n]
        out = np.zeros((sinos.shape[0],) + self.output_shape, np.float64)
        centre = (n - 1) / 2.0
        cols = np.arange(n)
        for a, theta in enumerate(self.angles_rad):
            u = self._x[None, :] * np.cos(theta) + self._y[:, None] * np.sin(theta) + centre
            for s in range(sinos.shape[0]):
                out[s] += np.interp(u, cols, filtered[s, a], left=0.0, right=0.0)
        # (π/N) Σ over N angles in [0, π); over [0, 2π) the same factor averages the two views of each ray.
        return (out * (np.pi / self.angles_rad.size)).astype(np.float32)


def shift_columns(sinos: np.ndarray, shift_px: float, *, margin: int = 16) -> np.ndarray:
    """Sub-pixel shift along the last axis by a Fourier phase ramp, on edge-padded data (float32 out).

    A 1-D FFT per row: much cheaper than a 3-D spline shift, exact for band-limited data.
    """
    n = sinos.shape[-1]
    padded = np.pad(sinos, [(0, 0)] * (sinos.ndim - 1) + [(margin, margin)], mode="edge")
    length = scipy.fft.next_fast_len(padded.shape[-1], real=True)
    spectrum = scipy.fft.rfft(padded, n=length, axis=-1)
    spectrum *= np.exp(-2j * np.pi * scipy.fft.rfftfreq(length) * shift_px).astype(np.complex64)
    return scipy.fft.irfft(spectrum, n=length, axis=-1)[..., margin : margin + n].astype(np.float32)


def _crop_centre(stack: np.ndarray, shape) -> np.ndarray:
    ny, nx = shape
    r0 = (stack.shape[-2] - ny) // 2
    c0 = (stack.shape[-1] - nx) // 2
    return stack[..., r0 : r0 + ny, c0 : c0 + nx]


def make_backend(name: str, n_columns: int, angles_rad, output_shape, *, center_offset_px: float = 0.0) -> FBPBackend:
    """Build a backend by name; ``auto`` picks ASTRA CUDA when a GPU is present, else ASTRA CPU.

    Raises
    ------
    ValueError
        Unknown name.
    ImportError
        The backend's package (or GPU) is missing; the message names it.
    """
    if name == "auto":
        import astra

        name = "astra_cuda" if astra.use_cuda() else "astra"
    classes = {"astra": AstraFBP, "astra_cuda": AstraCudaFBP, "tomopy": TomopyFBP, "numpy": NumpyFBP}
    if name not in classes:
        raise ValueError(f"Unknown FBP backend {name!r}. Available are: {['auto', *BACKENDS]}")
    return classes[name](n_columns, angles_rad, output_shape, center_offset_px=center_offset_px)
