"""report.html is self-contained and renders in headless Chromium with every image loaded."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import xarray as xr

from validation.report import build_report


@pytest.fixture
def run_dir(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = tmp_path / "run"
    (d / "T0").mkdir(parents=True)
    (d / "scenario.toml").write_text('name = "tiny"\n')
    (d / "schedule.csv").write_text("name,start_h,end_h\nT0,0.0,0.22\n")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [3.0, 4.3])
    fig.savefig(d / "timeline.png")
    plt.close(fig)
    rng = np.random.default_rng(0)
    xr.Dataset({"delta": (("z", "y", "x"), rng.random((12, 10, 10)).astype("f4"))}).to_netcdf(
        d / "T0" / "phantom.nc", engine="h5netcdf")
    from validation.budget import BUDGET_METRICS, ORACLES, error_budget

    base = {"segmentation.dice_si.mean": 0.95} | {m: 0.4 for m in BUDGET_METRICS}
    ablations = {stage: {m: 0.3 - 0.1 * k for m in BUDGET_METRICS} for k, (stage, _) in enumerate(ORACLES)}
    (d / "metrics.json").write_text(json.dumps(base | error_budget(base, ablations)))
    (d / "budget.json").write_text(json.dumps({"ablations": ablations}))
    return d


def test_report_embeds_everything(run_dir):
    page = build_report(run_dir).read_text()
    assert "src=\"data:image/png;base64," in page
    assert "file://" not in page and "src=\"/" not in page  # self-contained
    assert "segmentation.dice_si.mean" in page
    assert 'alt="error budget"' in page and "truth up to reconstruction" in page  # chart and ablation table
    assert "0.1 (25 %)" in page  # noise-free holograms remove 0.1 of the run's 0.4
    assert "Not produced by this run: strain.png" in page  # missing products are said, not hidden


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium not installed (Debian package 'chromium'; .ci/run installs it)")
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    from PIL import Image

    report = build_report(run_dir)
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text().replace(
        "</body>",
        "<script>window.addEventListener('load',()=>{const ok=Array.from(document.images)"
        ".every(i=>i.complete&&i.naturalWidth>0);document.body.setAttribute('data-images',"
        "ok?'loaded':'broken')})</script></body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run([_chromium(), *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    assert 'data-images="loaded"' in dom
    shot = tmp_path / "shot.png"
    subprocess.run([_chromium(), *flags, f"--screenshot={shot}", "--window-size=1200,1600", report.as_uri()],
                   capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 5, "the screenshot is blank"
