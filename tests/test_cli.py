"""The `twin` command line: exit codes and messages of the contract."""

from __future__ import annotations

import pytest


def test_check_prints_the_resolved_scenario_and_estimate(run_cli):
    res = run_cli("check", "tiny", "--set", "reconstruction.delta_beta=300")
    assert res.returncode == 0, res.stderr
    assert "delta_beta = 300.0" in res.stdout
    assert "peak memory" in res.stdout and "70×64×64" in res.stdout


def test_check_with_a_wrong_field_exits_2_and_names_the_path(run_cli):
    res = run_cli("check", "tiny", "--set", "beamline.propagation_distances_m[2]=-0.01")
    assert res.returncode == 2
    assert "beamline.propagation_distances_m[2]: must be > 0, got -0.01" in res.stderr
    assert "Traceback" not in res.stderr


def test_check_of_a_bad_file_exits_2(run_cli, tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[dic]\nnode_spacing_px = [10, 20]\n")
    res = run_cli("check", str(f))
    assert res.returncode == 2
    assert "dic.node_spacing_px: must decrease" in res.stderr


def test_check_refuses_a_scenario_bigger_than_this_machine_unless_forced(run_cli):
    res = run_cli("check", "paper")
    assert res.returncode == 2
    assert "GiB" in res.stderr and "--force" in res.stderr
    assert run_cli("check", "paper", "--force").returncode == 0


@pytest.mark.parametrize(
    "args",
    [
        ("segment", "nothing.nc", "--model", "m.keras", "--set", "segmentation.epochs=0"),
        ("run", "tiny", "--set", "run.workers=0"),
        ("check", "no_such_scenario"),
    ],
)
def test_invalid_input_exits_2_for_every_command(run_cli, args, tmp_path):
    res = run_cli(*args, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr


def test_unknown_option_is_a_usage_error(run_cli):
    res = run_cli("check", "tiny", "--no-such-option")
    assert res.returncode == 2


def test_python_dash_m_and_console_script_agree(run_cli):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    exe = shutil.which("twin", path=str(Path(sys.executable).parent)) or shutil.which("twin")
    assert exe is not None, "the `twin` console script is not installed"
    a = subprocess.run([exe, "check", "tiny"], capture_output=True, text=True)
    b = run_cli("check", "tiny")
    assert a.returncode == b.returncode == 0
    assert a.stdout == b.stdout
