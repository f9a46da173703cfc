"""The truth sampled for the DIC scores: reading only the bracketing planes equals interpolating the whole field."""

import numpy as np
import scipy.ndimage as ndi
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

from twin.io import write_netcdf
from validation.dic_scores import true_displacement_at


@settings(max_examples=30, deadline=None)
@given(nz=st.integers(1, 12), ny=st.integers(1, 7), nx=st.integers(1, 7), n_points=st.integers(1, 40),
       on_planes=st.booleans(), seed=st.integers(0, 2**16))
def test_true_displacement_from_bracketing_planes_equals_the_whole_field(tmp_path_factory, nz, ny, nx, n_points,
                                                                        on_planes, seed):
    """Against scipy's map_coordinates over the whole field (mode "nearest"), points inside, on planes and outside."""
    rng = np.random.default_rng(seed)
    shape = (nz, ny, nx)
    disp = rng.normal(size=(3,) + shape).astype(np.float32)
    path = tmp_path_factory.mktemp("truth") / "phantom.nc"
    write_netcdf(xr.Dataset({"displacement": (("component", "z", "y", "x"), disp)}), path)
    points = rng.uniform(-2.0, np.array(shape) + 1.0, (n_points, 3))
    if on_planes:
        points[:, 0] = np.round(points[:, 0])
    whole = np.stack([ndi.map_coordinates(disp[c].astype(np.float64), points.T, order=1, mode="nearest")
                      for c in range(3)], axis=1)
    np.testing.assert_allclose(true_displacement_at(path, points), whole, rtol=0, atol=1e-12)


def test_true_displacement_reads_the_field_in_any_dimension_order(tmp_path):
    """A phantom.nc whose displacement is stored (z, y, x, component) gives the same truth."""
    rng = np.random.default_rng(1)
    disp = rng.normal(size=(3, 6, 5, 4))
    points = rng.uniform(0, 4, (20, 3))
    write_netcdf(xr.Dataset({"displacement": (("component", "z", "y", "x"), disp)}), tmp_path / "a.nc")
    write_netcdf(xr.Dataset({"displacement": (("z", "y", "x", "component"), np.moveaxis(disp, 0, -1))}), tmp_path / "b.nc")
    np.testing.assert_array_equal(true_displacement_at(tmp_path / "a.nc", points), true_displacement_at(tmp_path / "b.nc", points))
