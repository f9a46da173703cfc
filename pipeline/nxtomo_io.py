"""Read NXtomo HDF5 files (the twin's or a beamline's) for reconstruction.

An NXtomo file holds one or more entries (``NXentry`` with ``definition =
NXtomo``); a holotomography scan is one entry per propagation distance. Each
entry is read with h5py at the standard NeXus paths (the same ones nabu's and
nxtomo's readers use), so a bad file gets an :class:`~twin.errors.InputFileError`
naming the file and the dataset, and detector frames can be read by slabs of
rows without loading the whole stack.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from twin.errors import InputFileError

PROJECTION, FLAT, DARK = 0, 1, 2

_LENGTH_TO_M = {"m": 1.0, "meter": 1.0, "mm": 1e-3, "millimeter": 1e-3, "um": 1e-6, "µm": 1e-6, "micron": 1e-6,
                "micrometer": 1e-6, "nm": 1e-9, "nanometer": 1e-9, "cm": 1e-2, "centimeter": 1e-2}
_ENERGY_TO_KEV = {"kev": 1.0, "ev": 1e-3, "mev": 1e3}


@dataclass
class DistanceEntry:
    """One NXtomo entry (one propagation distance) of a scan: metadata, and the frames read on demand.

    Attributes
    ----------
    path, entry : the file and the entry name.
    image_key : (frames,) 0 projection, 1 flat, 2 dark.
    rotation_angle_deg : (frames,) rotation angles, degrees.
    frame_shape : (rows, columns) of the detector.
    pixel_size_m : sample-plane pixel size, m.
    propagation_distance_m : effective (parallel-equivalent) distance, m.
    energy_kev : beam energy, keV.
    rotation_axis_offset_px : recorded axis position relative to the detector centre, pixels (None if absent).
    """

    path: Path
    entry: str
    image_key: np.ndarray
    rotation_angle_deg: np.ndarray
    frame_shape: tuple[int, int]
    pixel_size_m: float
    propagation_distance_m: float
    energy_kev: float
    rotation_axis_offset_px: float | None
    dtype: np.dtype = field(default=np.dtype(np.float32))

    @property
    def data_path(self) -> str:
        return f"{self.entry}/instrument/detector/data"

    def read(self, kind: int, rows: slice = slice(None), which=None) -> np.ndarray:
        """Frames of one kind (0/1/2), rows ``rows``, as float32 ``(frames, rows, cols)``; refuses NaN/inf.

        ``which``: positions among the frames of that kind (e.g. projection numbers); default all.
        """
        indices = np.flatnonzero(self.image_key == kind)
        if which is not None:
            indices = indices[np.asarray(which, dtype=int)]
        try:
            with h5py.File(self.path, "r") as f:
                dset = f[self.data_path]
                # h5py fancy indexing wants increasing indices: they are.
                data = np.asarray(dset[indices, rows, :], dtype=np.float32) if indices.size else np.empty((0, 0, 0), np.float32)
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise InputFileError(self.path, f"dataset {self.data_path}: cannot read frames ({exc})") from None
        if not np.all(np.isfinite(data)):
            bad = int(np.count_nonzero(~np.isfinite(data)))
            name = {PROJECTION: "projections", FLAT: "flats", DARK: "darks"}[kind]
            raise InputFileError(self.path, f"dataset {self.data_path}: {bad} NaN or infinite values in the {name}")
        return data

    @property
    def projection_angles_deg(self) -> np.ndarray:
        return self.rotation_angle_deg[self.image_key == PROJECTION]


@dataclass
class Scan:
    """A holotomography scan: its distance entries (sorted by distance) and the twin's metadata if present."""

    path: Path
    distances: list[DistanceEntry]
    simulation: dict | None

    @property
    def reference(self) -> DistanceEntry:
        return self.distances[0]


def _attr_str(obj, name: str) -> str | None:
    value = obj.attrs.get(name)
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def _scalar(f: h5py.File, paths: list[str], path: Path, unit_table: dict[str, float], default_unit: str) -> float | None:
    for p in paths:
        if p in f:
            dset = f[p]
            try:
                value = float(np.asarray(dset[()]).ravel()[0])
            except (TypeError, ValueError, IndexError) as exc:
                raise InputFileError(path, f"dataset {p}: not a number ({exc})") from None
            unit = (_attr_str(dset, "units") or _attr_str(dset, "unit") or default_unit).strip().lower()
            if unit not in unit_table:
                raise InputFileError(path, f"dataset {p}: unknown unit {unit!r}")
            return value * unit_table[unit]
    return None


def _read_entry(f: h5py.File, path: Path, entry: str) -> DistanceEntry:
    data_path = f"{entry}/instrument/detector/data"
    if data_path not in f or not isinstance(f[data_path], h5py.Dataset):
        raise InputFileError(path, f"dataset {data_path}: missing (not an NXtomo entry)")
    data = f[data_path]
    if data.ndim != 3:
        raise InputFileError(path, f"dataset {data_path}: expected 3 dimensions (frames, rows, columns), got shape {data.shape}")
    n_frames = data.shape[0]
    for key_name in ("image_key_control", "image_key"):
        key_path = f"{entry}/instrument/detector/{key_name}"
        if key_path in f:
            break
    else:
        raise InputFileError(path, f"dataset {entry}/instrument/detector/image_key: missing")
    image_key = np.asarray(f[key_path][()]).astype(int).ravel()
    if image_key.size != n_frames:
        raise InputFileError(path, f"dataset {key_path}: {image_key.size} keys for {n_frames} frames in {data_path}")
    angle_path = f"{entry}/sample/rotation_angle"
    if angle_path not in f:
        raise InputFileError(path, f"dataset {angle_path}: missing")
    angles = np.asarray(f[angle_path][()], dtype=float).ravel()
    if angles.size != n_frames:
        raise InputFileError(path, f"dataset {angle_path}: {angles.size} angles for {n_frames} frames in {data_path}")
    if (_attr_str(f[angle_path], "units") or "degree").lower().startswith("rad"):
        angles = np.rad2deg(angles)
    for kind, name in ((PROJECTION, "projections"), (FLAT, "flats"), (DARK, "darks")):
        if not np.any(image_key == kind):
            raise InputFileError(path, f"dataset {key_path}: no {name} (image_key {kind})")
    pixel = _scalar(f, [f"{entry}/sample/x_pixel_size", f"{entry}/instrument/detector/x_pixel_size"], path, _LENGTH_TO_M, "m")
    if pixel is None or pixel <= 0:
        raise InputFileError(path, f"dataset {entry}/instrument/detector/x_pixel_size: missing or not positive")
    energy = _scalar(f, [f"{entry}/instrument/beam/incident_energy", f"{entry}/beam/incident_energy"], path, _ENERGY_TO_KEV, "kev")
    if energy is None or energy <= 0:
        raise InputFileError(path, f"dataset {entry}/instrument/beam/incident_energy: missing or not positive")
    distance = _scalar(f, [f"{entry}/sample/propagation_distance"], path, _LENGTH_TO_M, "m")
    if distance is None:
        z2 = _scalar(f, [f"{entry}/instrument/detector/distance"], path, _LENGTH_TO_M, "m")
        z1 = _scalar(f, [f"{entry}/instrument/source/distance"], path, _LENGTH_TO_M, "m")
        if z2 is None:
            raise InputFileError(path, f"dataset {entry}/instrument/detector/distance: missing (no propagation distance)")
        distance = z2 if not z1 else abs(z1) * z2 / (abs(z1) + z2)
    cor_path = f"{entry}/instrument/detector/x_rotation_axis_pixel_position"
    cor = float(np.asarray(f[cor_path][()]).ravel()[0]) if cor_path in f else None
    return DistanceEntry(
        path=path,
        entry=entry,
        image_key=image_key,
        rotation_angle_deg=angles,
        frame_shape=(int(data.shape[1]), int(data.shape[2])),
        pixel_size_m=pixel,
        propagation_distance_m=float(distance),
        energy_kev=energy,
        rotation_axis_offset_px=cor,
        dtype=data.dtype,
    )


def open_scan(path: str | Path, *, expected_distances_m: list[float] | None = None) -> Scan:
    """Read the metadata of every NXtomo entry of a file.

    Parameters
    ----------
    path : path
        NXtomo HDF5 file.
    expected_distances_m : list of float, optional
        If given, the file's propagation distances must match them (relative 1e-6).

    Raises
    ------
    InputFileError
        Not HDF5, no NXtomo entry, a missing or inconsistent dataset, entries of
        different frame shapes or angles, or distances that do not match.
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "no such file")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise InputFileError(path, f"not a readable HDF5 file ({exc})") from None
    with f:
        entries = []
        for name in sorted(f.keys()):
            grp = f[name]
            if not isinstance(grp, h5py.Group):
                continue
            definition = f.get(f"{name}/definition")
            is_nxtomo = definition is not None and np.asarray(definition[()]).astype(str).ravel()[0].lower() == "nxtomo"
            if is_nxtomo or f"{name}/instrument/detector/data" in f:
                entries.append(_read_entry(f, path, name))
        if not entries:
            raise InputFileError(path, "dataset /entry*/instrument/detector/data: no NXtomo entry in the file")
        simulation = None
        sim_path = f"{entries[0].entry}/twin_simulation/parameters_json"
        if sim_path in f:
            raw = f[sim_path][()]
            try:
                simulation = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
            except json.JSONDecodeError as exc:
                raise InputFileError(path, f"dataset {sim_path}: not JSON ({exc})") from None
    entries.sort(key=lambda e: e.propagation_distance_m)
    ref = entries[0]
    for e in entries[1:]:
        if e.frame_shape != ref.frame_shape:
            raise InputFileError(path, f"dataset {e.data_path}: frame shape {e.frame_shape} differs from {ref.data_path} {ref.frame_shape}")
        if e.projection_angles_deg.shape != ref.projection_angles_deg.shape or not np.allclose(
            e.projection_angles_deg, ref.projection_angles_deg, atol=1e-3
        ):
            raise InputFileError(path, f"dataset {e.entry}/sample/rotation_angle: projection angles differ from {ref.entry}")
    if expected_distances_m is not None:
        found = [e.propagation_distance_m for e in entries]
        if len(found) != len(expected_distances_m) or not np.allclose(sorted(expected_distances_m), found, rtol=1e-6):
            raise InputFileError(
                path,
                f"dataset /entry*/sample/propagation_distance: distances {found} m do not match "
                f"beamline.propagation_distances_m {list(expected_distances_m)}",
            )
    return Scan(path=path, distances=entries, simulation=simulation)
