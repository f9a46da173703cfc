"""Damaged or wrong input files: every command names the file, exits 2, prints no traceback, and runs no code."""

from __future__ import annotations

import numpy as np
import pytest


def _volumes(tmp_path):
    import tifffile
    import xarray as xr

    good = tmp_path / "good.tif"
    tifffile.imwrite(good, np.random.default_rng(0).random((8, 16, 16)).astype(np.float32))
    blob = good.read_bytes()
    cases = {
        "truncated.tif": blob[: len(blob) // 3],
        "text.tif": b"this is not a TIFF\n" * 10,
        "empty.tif": b"",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    nan = np.ones((8, 16, 16), np.float32)
    nan[3, 4, 5] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", nan)
    tifffile.imwrite(tmp_path / "four_d.tif", np.ones((2, 3, 16, 16), np.float32))
    xr.Dataset({"other": (("z", "y", "x"), np.ones((4, 8, 8), np.float32))}).to_netcdf(tmp_path / "novolume.nc",
                                                                                       engine="h5netcdf")
    nc = (tmp_path / "novolume.nc").read_bytes()
    (tmp_path / "truncated.nc").write_bytes(nc[: len(nc) // 2])
    return good


BAD = ["truncated.tif", "text.tif", "empty.tif", "nan.tif", "four_d.tif", "novolume.nc", "truncated.nc", "missing.tif"]


@pytest.mark.parametrize("bad", BAD)
def test_dic_names_a_bad_volume_and_exits_2(run_cli, tmp_path, bad):
    good = _volumes(tmp_path)
    res = run_cli("dic", str(good), bad, "--scenario", "tiny", "--out", "out", cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert bad in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out" / "phi_field.nc").exists()


@pytest.mark.parametrize("bad", ["truncated.tif", "nan.tif", "truncated.nc"])
def test_segment_and_train_name_a_bad_file_and_exit_2(run_cli, tmp_path, bad):
    good = _volumes(tmp_path)
    res = run_cli("segment", bad, "--model", "m.keras", "--scenario", "tiny", "--out", "seg", cwd=tmp_path)
    assert res.returncode == 2 and bad in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
    res = run_cli("train", str(good), bad, "--scenario", "tiny", "--out", "model", cwd=tmp_path)
    assert res.returncode == 2 and bad in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "seg").exists() or not any((tmp_path / "seg").iterdir())


def test_a_model_with_code_in_it_is_refused_without_running_the_code(tmp_path, monkeypatch):
    """A .keras file whose Lambda layer would write a file when deserialized: safe mode refuses it."""
    import keras

    from pipeline.segmentation import UNetSegmenter
    from twin.errors import InputFileError

    marker = tmp_path / "code_ran"
    monkeypatch.setenv("TWIN_TEST_CODE_RAN", str(marker))
    inputs = keras.Input((16, 16, 1))
    outputs = keras.layers.Lambda(lambda x: (open(__import__("os").environ["TWIN_TEST_CODE_RAN"], "w").close(), x)[1])(inputs)
    path = tmp_path / "evil.keras"
    keras.Model(inputs, outputs).save(path)
    marker.unlink(missing_ok=True)  # building the model ran it once, legitimately
    with pytest.raises(InputFileError, match="evil.keras"):
        UNetSegmenter.load(path, tile_shape_px=[16, 16])
    assert not marker.exists()
