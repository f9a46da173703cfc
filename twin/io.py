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
file that looks valid. :class:`WriteBehind` moves a streamed file's compression
onto a background thread while the producer computes.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

NETCDF_ENGINE = "h5netcdf"
NETCDF_COMPRESSION = {"compression": "gzip", "compression_opts": 1, "shuffle": True}
# threads that deflate a write-behind slab's planes together (zlib releases the GIL); 1 on a 2-core machine, where
# the producer's own threads take both cores
COMPRESSION_THREADS = max(1, (os.cpu_count() or 1) - 2)
_deflaters = None  # (threads, their pool), made on first use


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


class WriteBehind:
    """Writes into array-like targets (h5py / h5netcdf variables) done in order by one background thread.

    HDF5's gzip runs on one core; a producer whose work releases the GIL (the phantom's compiled
    passes do) computes the next slab meanwhile, and a slab's planes are deflated by
    ``COMPRESSION_THREADS`` threads together (the cores the machine has beyond two).
    ``behind.into(target)`` takes ``obj[key] = value`` as
    ``target`` does; the value is written later, so the caller must not change it afterwards (give
    fresh arrays). At most ``max_pending`` writes wait, holding their arrays. Leaving the ``with``
    waits for every write and raises the thread's first error (e.g. the disk is full); a write
    queued after that error raises it at once. On an error in the ``with`` body, writes still
    waiting are dropped (the file is being abandoned).

    Examples
    --------
    >>> import numpy as np
    >>> target = np.zeros(4)
    >>> with WriteBehind() as behind:
    ...     behind.into(target)[1:3] = np.ones(2)
    >>> target
    array([0., 1., 1., 0.])
    """

    def __init__(self, max_pending: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._abandon = False
        self._thread = threading.Thread(target=self._run, name="write-behind", daemon=True)

    def __enter__(self) -> WriteBehind:
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._abandon = exc_type is not None
        self._queue.put(None)
        self._thread.join()
        if exc_type is None and self._error is not None:
            raise self._error

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None and not self._abandon:
                try:
                    _store(*item)
                except BaseException as err:  # noqa: BLE001 - handed to the producer
                    self._error = err

    def into(self, target) -> _Behind:
        """A stand-in for ``target`` whose item assignments are queued."""
        return _Behind(self, target)

    def _put(self, target, key, value) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((target, key, value))


def _store(target, key, value) -> None:
    """``target[key] = value``; whole planes of a dataset chunked by planes with shuffle + gzip are filtered
    here and written as raw chunks: h5py holds the GIL through HDF5's filters, ``zlib`` releases it, so
    the producer runs meanwhile. The bytes are those HDF5's filters make (shuffle, then deflate at the
    dataset's level), which any reader decodes."""
    import numpy as np

    dataset = getattr(target, "_h5ds", target)  # an h5netcdf variable's h5py dataset
    starts = _plane_starts(dataset, key, np.shape(value))
    if starts is None:
        target[key] = value
        return
    import zlib

    value = np.ascontiguousarray(value, dtype=dataset.dtype)
    planes = value.reshape(-1, *value.shape[-2:])
    itemsize, level = dataset.dtype.itemsize, dataset.compression_opts

    def deflate(plane):
        return zlib.compress(plane.reshape(-1).view(np.uint8).reshape(-1, itemsize).T.tobytes(), level)

    chunks = map(deflate, planes)
    if COMPRESSION_THREADS > 1 and len(planes) > 1:
        global _deflaters
        if _deflaters is None or _deflaters[0] != COMPRESSION_THREADS:
            from concurrent.futures import ThreadPoolExecutor

            _deflaters = (COMPRESSION_THREADS, ThreadPoolExecutor(COMPRESSION_THREADS, thread_name_prefix="deflate"))
        chunks = _deflaters[1].map(deflate, planes)
    for offset, chunk in zip(starts, chunks):
        dataset.id.write_direct_chunk(offset, chunk)


def _plane_starts(dataset, key, shape) -> list[tuple[int, ...]] | None:
    """Chunk offsets of the planes ``dataset[key]`` covers, when the write is whole shuffle + gzip plane chunks
    of an h5py dataset; otherwise None (an ordinary write)."""
    import numpy as np

    ds_shape = getattr(dataset, "shape", None)
    if (getattr(dataset, "id", None) is None or not hasattr(dataset.id, "write_direct_chunk")
            or dataset.compression != "gzip" or not dataset.shuffle or dataset.fletcher32
            or dataset.scaleoffset is not None or dataset.chunks != (1,) * (len(ds_shape) - 2) + tuple(ds_shape[-2:])):
        return None
    key = key if isinstance(key, tuple) else (key,)
    if len(key) > len(ds_shape) or not all(isinstance(k, slice) and k.step in (None, 1) for k in key):
        return None
    key = key + (slice(None),) * (len(ds_shape) - len(key))
    ranges = [range(*k.indices(n)) for k, n in zip(key, ds_shape)]
    if tuple(len(r) for r in ranges) != tuple(shape) or any(len(r) != n for r, n in zip(ranges[-2:], ds_shape[-2:])):
        return None
    return [tuple(int(r[i]) for r, i in zip(ranges, idx)) + (0, 0) for idx in np.ndindex(*shape[:-2])]


class _Behind:
    def __init__(self, behind: WriteBehind, target):
        self._behind, self._target = behind, target

    def __setitem__(self, key, value) -> None:
        self._behind._put(self._target, key, value)


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


@contextlib.contextmanager
def streamed_netcdf(path: str | Path, dimensions: dict[str, int], variables: dict[str, tuple], *,
                    coords: dict[str, tuple] | None = None) -> Iterator:
    """A netCDF-4 file to fill variable by variable, slab by slab; yields the open ``h5netcdf.File``.

    ``variables``: name → (dims, dtype, attrs), each chunked by planes of its last two
    dimensions and compressed as :func:`write_netcdf` does; ``coords``: name → (values, attrs)
    along the dimension of that name (text values as variable-length strings). Fill
    ``f.variables[name][...]`` and ``f.attrs``; xarray reads the file as it reads what
    :func:`write_netcdf` writes of the same dataset. It appears only when complete.
    """
    import h5netcdf
    import h5py
    import numpy as np

    with atomic_path(path) as tmp, h5netcdf.File(tmp, "w") as f:
        f.dimensions = dict(dimensions)
        for name, (values, attrs) in (coords or {}).items():
            values = np.asarray(values)
            text = values.dtype.kind in "OU"
            f.create_variable(name, (name,), data=values.astype(object) if text else values,
                              dtype=h5py.string_dtype() if text else None).attrs.update(attrs)
        for name, (dims, dtype, attrs) in variables.items():
            chunks = (1,) * (len(dims) - 2) + tuple(dimensions[d] for d in dims[-2:])
            f.create_variable(name, dims, dtype, chunks=chunks, **NETCDF_COMPRESSION).attrs.update(attrs)
        yield f


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
