"""twin.io's write-behind: planes compressed outside HDF5 decode to what was written, errors reach the producer."""

import time

import h5netcdf
import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

from twin.io import NETCDF_COMPRESSION, WriteBehind


def _variables(f, shape, dtype):
    f.dimensions = {"c": 2, "z": shape[0], "y": shape[1], "x": shape[2]}
    kw = dict(dtype=dtype, **NETCDF_COMPRESSION)
    return {"planes": f.create_variable("planes", ("z", "y", "x"), chunks=(1,) + shape[1:], **kw),
            "stack": f.create_variable("stack", ("c", "z", "y", "x"), chunks=(1, 1) + shape[1:], **kw),
            "blocks": f.create_variable("blocks", ("z", "y", "x"), chunks=tuple(min(2, n) for n in shape), **kw)}


@settings(max_examples=25, deadline=None)
@given(nz=st.integers(1, 7), ny=st.integers(1, 9), nx=st.integers(1, 9), step=st.integers(1, 4),
       dtype=st.sampled_from([np.uint8, np.int32, np.float32, np.float64]), seed=st.integers(0, 2**16))
def test_write_behind_files_decode_to_the_values_written(tmp_path_factory, nz, ny, nx, step, dtype, seed):
    """Through WriteBehind (whole plane chunks: shuffled and deflated here; anything else: HDF5's own write) and
    through plain assignment, every variable reads back (h5netcdf and xarray) as the values written."""
    rng = np.random.default_rng(seed)
    shape = (nz, ny, nx)
    values = {"planes": rng.integers(0, 200, shape), "stack": rng.normal(0, 1e3, (2,) + shape),
              "blocks": rng.integers(0, 200, shape)}
    values = {k: v.astype(dtype) for k, v in values.items()}
    path = tmp_path_factory.mktemp("wb") / "behind.nc"
    with h5netcdf.File(path, "w") as f:
        variables = _variables(f, shape, dtype)
        with WriteBehind() as behind:
            for z0 in range(0, nz, step):
                z = slice(z0, z0 + step)
                behind.into(variables["planes"])[z] = values["planes"][z].copy()
                behind.into(variables["stack"])[:, z] = values["stack"][:, z].copy()
                behind.into(variables["blocks"])[z] = values["blocks"][z].copy()
            behind.into(variables["planes"])[0, : ny // 2] = values["planes"][0, : ny // 2]  # part of a plane
    with xr.open_dataset(path, engine="h5netcdf") as ds:
        for name, v in values.items():
            np.testing.assert_array_equal(ds[name].values, v)
            assert ds[name].encoding["zlib"] and ds[name].encoding["shuffle"]


def test_planes_deflated_by_several_threads_give_the_same_file(tmp_path, monkeypatch):
    """With several compression threads (machines with more than two cores) the chunks written are byte for byte
    those of one thread, in order."""
    import h5py

    values = np.random.default_rng(0).normal(0, 1, (9, 5, 6)).astype(np.float32)
    chunks = {}
    for threads in (1, 3):
        monkeypatch.setattr("twin.io.COMPRESSION_THREADS", threads)
        path = tmp_path / f"{threads}.nc"
        with h5netcdf.File(path, "w") as f:
            variable = _variables(f, values.shape, np.float32)["planes"]
            with WriteBehind() as behind:
                behind.into(variable)[0:4] = values[0:4].copy()
                behind.into(variable)[4:9] = values[4:9].copy()
        with h5py.File(path) as f:
            chunks[threads] = [f["planes"].id.read_direct_chunk((z, 0, 0))[1] for z in range(9)]
            np.testing.assert_array_equal(f["planes"][...], values)
    assert chunks[1] == chunks[3]


def test_write_behind_hands_the_writers_error_to_the_producer():
    """A failing write (the disk full) is raised when the producer next writes, and on leaving the ``with``."""
    class Full:
        def __setitem__(self, key, value):
            raise OSError(28, "No space left on device")

    sink = np.zeros(3)
    with pytest.raises(OSError, match="No space"):  # on leaving the ``with``
        with WriteBehind() as behind:
            behind.into(Full())[0] = 1.0
            deadline = time.monotonic() + 30
            while behind._error is None and time.monotonic() < deadline:  # the thread has met it
                time.sleep(0.001)
            with pytest.raises(OSError, match="No space"):  # and at the next write, which is not queued
                behind.into(sink)[1] = 2.0
    assert sink[1] == 0.0
    with pytest.raises(OSError, match="No space"):
        with WriteBehind() as behind:
            behind.into(Full())[0] = 1.0
    with pytest.raises(KeyError):  # the body's own error wins; queued writes are dropped
        with WriteBehind() as behind:
            behind.into(Full())[0] = 1.0
            raise KeyError("body")
