"""Fresnel (paraxial) free-space propagation of a 2-D complex wave, and the analytic edge solution.

Written by hand because no installed library propagates a wave field on the CPU
with the padding and sampling checks the instrument needs: nabu only retrieves
phase (the inverse problem), and PyNX's propagators are not installable here.
The propagator is the textbook transfer-function (angular-spectrum, paraxial)
form, a few lines of ``scipy.fft``.

Conventions: a monochromatic wave ``exp(i(kz − ωt))``; a sample of refractive
index ``n = 1 − δ + iβ`` turns a unit plane wave into the exit wave
``ψ = exp(−k∫β dl − i k∫δ dl)``; propagation over a distance ``z`` multiplies
the spectrum by ``H(f) = exp(−iπλz|f|²)`` (the constant ``exp(ikz)`` is dropped).
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.fft
import scipy.special

from twin.warnings import TwinWarning


def _fast_length(n: int) -> int:
    return scipy.fft.next_fast_len(int(n), real=False)


class FresnelPropagator:
    """Propagate 2-D complex waves over one distance by the Fresnel transfer function.

    Builds the padded kernel once; ``__call__`` applies it to one image or a stack.

    Parameters
    ----------
    shape : tuple of int
        ``(rows, columns)`` of the images, pixels.
    pixel_size_m : float
        Sample-plane pixel size, m.
    wavelength_m : float
        X-ray wavelength λ, m.
    distance_m : float
        Effective (parallel-beam) propagation distance z, m.
    pad_factor : float
        Each side is padded to at least ``pad_factor`` times its length (edge
        values) so that the periodic FFT does not wrap fringes around.

    Warns
    -----
    TwinWarning
        When the transfer function's chirp is undersampled, i.e. when
        ``λz > N p²`` on the padded grid (``N · N_F < 1`` with the pixel
        Fresnel number ``N_F = p²/(λz)``): the propagated image then aliases.

    Notes
    -----
    .. math:: \\psi_z = \\mathcal{F}^{-1}\\{\\mathcal{F}\\{\\psi_0\\}\\,\\exp(-i\\pi\\lambda z (f_x^2 + f_y^2))\\}

    The chirp's local frequency in Fourier space is ``λ z f``; at the Nyquist
    frequency ``f = 1/(2p)`` it must stay below the Fourier-space Nyquist
    ``N p / 2``, which gives the condition above (Voelz & Roggemann, Appl. Opt.
    48, 6132 (2009), doi:10.1364/AO.48.006132).
    """

    def __init__(self, shape, *, pixel_size_m: float, wavelength_m: float, distance_m: float, pad_factor: float = 2.0):
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"shape: expected (rows, columns) >= 1, got {shape!r}")
        if pixel_size_m <= 0 or wavelength_m <= 0 or distance_m < 0:
            raise ValueError(
                f"pixel_size_m, wavelength_m must be > 0 and distance_m >= 0, got {pixel_size_m}, {wavelength_m}, {distance_m}"
            )
        self.shape = tuple(int(n) for n in shape)
        self.padded_shape = tuple(_fast_length(max(n, np.ceil(pad_factor * n))) for n in self.shape)
        self.pixel_size_m = float(pixel_size_m)
        self.wavelength_m = float(wavelength_m)
        self.distance_m = float(distance_m)
        self.fresnel_number = self.pixel_size_m**2 / (self.wavelength_m * self.distance_m) if distance_m > 0 else np.inf
        n_min = min(self.padded_shape)
        if self.wavelength_m * self.distance_m > n_min * self.pixel_size_m**2:
            warnings.warn(
                f"Fresnel propagator over {distance_m:g} m aliases: λz = {self.wavelength_m * distance_m:.3g} m² exceeds "
                f"N p² = {n_min * self.pixel_size_m**2:.3g} m² (pixel Fresnel number {self.fresnel_number:.3g}, "
                f"padded size {n_min}); use smaller distances, larger pixels or more padding",
                TwinWarning,
                stacklevel=2,
            )
        fy = scipy.fft.fftfreq(self.padded_shape[0], d=self.pixel_size_m)
        fx = scipy.fft.fftfreq(self.padded_shape[1], d=self.pixel_size_m)
        f2 = fy[:, None] ** 2 + fx[None, :] ** 2
        self.kernel = np.exp(-1j * np.pi * self.wavelength_m * self.distance_m * f2)
        self._kernel64 = self.kernel.astype(np.complex64)

    def _pad_widths(self):
        return [((p - n) // 2, p - n - (p - n) // 2) for n, p in zip(self.shape, self.padded_shape)]

    def __call__(self, wave: np.ndarray, *, workers: int = 1) -> np.ndarray:
        """Propagate one complex image ``(rows, cols)`` or a stack ``(..., rows, cols)``.

        complex64 input is propagated in single precision (complex64 out), anything else in double.
        """
        return self.from_spectrum(self.spectrum(wave, workers=workers), workers=workers)

    def spectrum(self, wave: np.ndarray, *, workers: int = 1) -> np.ndarray:
        """The padded wave's 2D Fourier transform: the same for every distance of one grid, so a
        multi-distance scan transforms each exit wave once (:meth:`from_spectrum` per distance)."""
        wave = np.asarray(wave)
        if wave.shape[-2:] != self.shape:
            raise ValueError(f"wave: expected trailing shape {self.shape}, got {wave.shape}")
        # Edge padding: the wave continues as it is at the border (flat beam around the sample).
        padded = np.pad(wave, [(0, 0)] * (wave.ndim - 2) + self._pad_widths(), mode="edge")
        return scipy.fft.fft2(padded, workers=workers)

    def from_spectrum(self, spectrum: np.ndarray, *, workers: int = 1) -> np.ndarray:
        """The wave at this propagator's distance from :meth:`spectrum` (of a propagator with the same
        padded shape), cropped to ``shape``; ``spectrum`` is left as it is."""
        if spectrum.shape[-2:] != self.padded_shape:
            raise ValueError(f"spectrum: expected trailing shape {self.padded_shape}, got {spectrum.shape}")
        propagated = spectrum * (self._kernel64 if spectrum.dtype == np.complex64 else self.kernel)
        out = scipy.fft.ifft2(propagated, workers=workers, overwrite_x=True)
        (t, _), (l, _) = self._pad_widths()
        return out[..., t : t + self.shape[0], l : l + self.shape[1]]


def fresnel_half_plane(x_m: np.ndarray, *, wavelength_m: float, distance_m: float) -> np.ndarray:
    """Analytic Fresnel diffraction of a unit plane wave by an opaque half-plane (open for x > 0).

    Parameters
    ----------
    x_m : array
        Transverse positions relative to the edge, m.
    wavelength_m, distance_m : float
        λ and z, m.

    Returns
    -------
    complex array
        The propagated field ``U(x)`` (``|U| → 1`` for x ≫ √(λz), ``→ 0`` for x ≪ −√(λz)).

    Notes
    -----
    With ``w = x √(2/(λz))`` and the Fresnel integrals ``C``, ``S``,
    for the transfer function ``exp(−iπλz f²)``:

    .. math:: U(x) = \\frac{1}{1+i}\\left[\\left(\\tfrac12 + C(w)\\right) + i\\left(\\tfrac12 + S(w)\\right)\\right]

    (Born & Wolf, *Principles of Optics*, §8.7; the sign of ``i`` follows the
    ``exp(−iπλz f²)`` convention of :class:`FresnelPropagator`.) A straight
    edge of complex transmission ``t`` (``t`` for x > 0, 1 for x < 0) then gives
    ``1 + (t − 1) U(x)`` by linearity.
    """
    w = np.asarray(x_m, dtype=float) * np.sqrt(2.0 / (wavelength_m * distance_m))
    s, c = scipy.special.fresnel(w)
    return ((0.5 + c) + 1j * (0.5 + s)) / (1 + 1j)
