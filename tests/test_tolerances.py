import pytest

from twin.errors import InputFileError
from validation.tolerances import Bound, load_bounds, violations


def test_violations_name_metric_value_and_bound():
    bounds = [Bound("segmentation.dice_si.mean", 0.9, None, 0.95), Bound("dic.volumetric_strain_mae.max", None, 2e-3, 1e-3)]
    assert violations({"segmentation.dice_si.mean": 0.93, "dic.volumetric_strain_mae.max": 1e-3}, bounds) == []
    problems = violations({"segmentation.dice_si.mean": 0.85, "dic.volumetric_strain_mae.max": float("nan")}, bounds)
    assert problems[0] == "segmentation.dice_si.mean = 0.85 is below its bound min = 0.9 (measured 0.95 when set)"
    assert problems[1].startswith("dic.volumetric_strain_mae.max: missing or not finite")


def test_bounds_file_errors_name_the_file(tmp_path):
    f = tmp_path / "tol.toml"
    f.write_text('[metrics."a.b"]\nmeasured = 1\n')
    with pytest.raises(InputFileError, match="tol.toml.*needs min and/or max"):
        load_bounds(f)
    f.write_text('[metrics."a.b"]\nmin = 1\nmni = 2\n')
    with pytest.raises(InputFileError, match="unknown keys"):
        load_bounds(f)


def test_packaged_bounds_file_loads():
    assert isinstance(load_bounds(), list)
