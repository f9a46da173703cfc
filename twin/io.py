"""Atomic file writing and the project's array store.

The array store is netCDF-4 (HDF5 underneath) written by xarray through
``h5netcdf``: one self-describing file per product with coordinates in µm and
attributes for provenance, readable by every netCDF tool, and built on h5py,
which the NXtomo files need anyway (no second binary stack as netCDF4-C or
zarr's codecs would add). Large volumes are chunked and compressed inside the
file, so readers can take slabs with ``xarray.open_dataset(..., chunks=...)``.

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

NETCDF_ENGINE = "h5netcdf"


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
    """Write an ``xarray.Dataset`` atomically to netCDF-4 (h5netcdf), compressing float and integer variables."""
    encoding = {}
    if compress:
        for name, var in dataset.data_vars.items():
            if var.dtype.kind in "fiu" and var.ndim >= 1:
                encoding[name] = {"compression": "gzip", "compression_opts": 1}
    with atomic_path(path) as tmp:
        dataset.to_netcdf(tmp, engine=NETCDF_ENGINE, encoding=encoding)
    return Path(path)
