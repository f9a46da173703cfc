"""Atomic file writing and the project's array store.

The array store is netCDF-4 (HDF5 underneath) written by xarray through
``h5netcdf``: one self-describing file per product with coordinates in µm and
attributes for provenance, readable by every netCDF tool, and built on h5py,
which the NXtomo files need anyway (no second binary stack as netCDF4-C or
zarr's codecs would add). Large volumes are chunked and compressed inside the
file, so readers can take slabs with ``xarray.open_dataset(..., chunks=...)``.

:func:`read_volume` is the one reader of a volume given by a user or a stage
(``.nc`` with ``volume``, or TIFF), with the checks every command needs.

Every writer goes through :func:`atomic_path`: the file appears under its name
only once it is complete, so an interrupted run never leaves a half-written
file that looks valid.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

NETCDF_ENGINE = "h5netcdf"
NETCDF_COMPRESSION = {"compression": "gzip", "compression_opts": 1, "shuffle": True}


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, on error delete it.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
    >>> with atomic_path(target) as tmp:
    ...     _ = tmp.write_text("done")
    >>> target.read_text()
    'done'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if tmp.exists():
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_netcdf(dataset, path: str | Path, *, compress: bool = True) -> Path:
    """Write an ``xarray.Dataset`` atomically to netCDF-4 (h5netcdf), compressing float and integer variables.

    gzip level 1 after HDF5's byte shuffle (``NETCDF_COMPRESSION``): on the twin's volumes the shuffle makes
    deflate ~1.4× faster and the files ~10 % smaller.
    """
    encoding = {}
    if compress:
        for name, var in dataset.data_vars.items():
            if var.dtype.kind in "fiu" and var.ndim >= 1:
                encoding[name] = dict(NETCDF_COMPRESSION)
    with atomic_path(path) as tmp:
        dataset.to_netcdf(tmp, engine=NETCDF_ENGINE, encoding=encoding)
    return Path(path)


def read_volume(path: str | Path, *, allow_2d: bool = False) -> tuple[np.ndarray, float | None]:
    """A volume from ``.nc`` (variable ``volume``) or ``.tif``/``.tiff``; returns (float32 array, voxel_size_um or None).

    With ``allow_2d`` a single 2D image is returned as a stack of one slice.

    Raises
    ------
    InputFileError
        Missing, truncated or corrupt file, unknown suffix, no ``volume`` variable, not 3D, NaN or infinite values.
    """
    import numpy as np
    import xarray as xr

    from twin.errors import InputFileError

    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".nc":
            with xr.open_dataset(path, engine=NETCDF_ENGINE) as ds:
                if "volume" not in ds:
                    raise InputFileError(path, f"no variable 'volume' (has {sorted(ds.data_vars)})")
                array = ds["volume"].values
                voxel = ds.attrs.get("voxel_size_um", ds["volume"].attrs.get("voxel_size_um"))
        elif suffix in (".tif", ".tiff"):
            import tifffile

            array, voxel = tifffile.imread(path), None
        else:
            raise InputFileError(path, f"unknown volume format {suffix!r}; expected .nc (variable 'volume') or .tif")
    except InputFileError:
        raise
    except Exception as exc:  # a corrupt file: name it
        raise InputFileError(path, f"cannot be read ({type(exc).__name__}: {exc})") from exc
    if allow_2d and array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise InputFileError(path, f"expected a 3D volume (z, y, x), got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise InputFileError(path, "volume contains NaN or infinite values")
    return np.asarray(array, dtype=np.float32), None if voxel is None else float(voxel)
