"""``report.html``: one self-contained page (images embedded) of a run, for reading before beamtime.

The page is built only from the files a run published (``twin run`` or
``twin report RUN_DIR``), so it can be rebuilt at any time. A section whose
products the run did not make says so instead of being left out silently.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path

import numpy as np

from twin.io import atomic_path
from validation import HEADLINE_METRICS


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _img_file(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _scan_dirs(run_dir: Path) -> list[Path]:
    def order(p: Path) -> int:
        return int(p.name[1:]) if p.name[1:].isdigit() else 10**6

    return sorted((p for p in run_dir.glob("T*") if p.is_dir()), key=order)


def _slices_figure(scan_dir: Path) -> str | None:
    """Central xz and xy slices of truth δ, reconstruction and segmentation, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import xarray as xr

    panels = []
    for fname, var, title, cmap in (("phantom.nc", "delta", "truth δ", "gray"), ("volume.nc", "volume", "reconstruction", "gray"),
                                    ("labels.nc", "labels", "segmentation", "viridis")):
        path = scan_dir / fname
        if path.exists():
            with xr.open_dataset(path, engine="h5netcdf") as ds:
                if var in ds:
                    vol = ds[var]
                    panels.append((title, np.asarray(vol[:, vol.shape[1] // 2, :]), np.asarray(vol[vol.shape[0] // 2]), cmap))
    if not panels:
        return None
    fig, axes = plt.subplots(2, len(panels), figsize=(3.4 * len(panels), 6), squeeze=False)
    for col, (title, xz, xy, cmap) in enumerate(panels):
        axes[0, col].imshow(xz, cmap=cmap, origin="lower")
        axes[0, col].set_title(f"{title} (x–z)", fontsize=9)
        axes[1, col].imshow(xy, cmap=cmap)
        axes[1, col].set_title(f"{title} (x–y, mid height)", fontsize=9)
        for ax in axes[:, col]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(scan_dir.name)
    return _png(fig)


def _table(rows: list[list[str]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _missing(what: str) -> str:
    return f'<p class="missing">Not produced by this run: {html.escape(what)}.</p>'


#: Metrics shown for the run and each oracle ablation side by side.
_ABLATION_METRICS = tuple(m for m in HEADLINE_METRICS if not m.startswith("truth."))


def _budget_section(run_dir: Path, values: dict, budget: dict) -> list[str]:
    """The budget table, a bar chart of each stage's share, and the run next to each ablation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from validation.budget import BUDGET_METRICS, BUDGET_STAGES, REMAINDER, budget_columns, budget_table

    parts = ["<p>Each column: how much of the run's error disappears when that stage's product is replaced by the truth, "
             "given perfect products upstream (oracle ablation, in data-flow order; <code>dic</code> is what is left). "
             "The contributions add up to the run's error.</p>",
             _table(budget_table(values, budget), budget_columns())]
    stages = BUDGET_STAGES
    metrics = [m for m in BUDGET_METRICS if f"budget.{REMAINDER}.{m}" in budget and values.get(m)]
    if metrics:
        fig, ax = plt.subplots(figsize=(8, 0.6 + 0.6 * len(metrics)))
        left_pos, left_neg = np.zeros(len(metrics)), np.zeros(len(metrics))
        for stage in stages:
            share = np.array([100 * budget[f"budget.{stage}.{m}"] / values[m] for m in metrics])
            left = np.where(share >= 0, left_pos, left_neg)
            ax.barh(range(len(metrics)), share, left=left, label=stage)
            left_pos, left_neg = left_pos + np.maximum(share, 0), left_neg + np.minimum(share, 0)
        ax.set_yticks(range(len(metrics)), metrics, fontsize=8)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_xlabel("share of the run's error, %")
        ax.legend(ncol=len(stages), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.35 if len(metrics) < 3 else -0.2))
        parts.append(f'<img alt="error budget" src="{_png(fig)}">')
    record = run_dir / "budget.json"
    if record.exists():
        ablations = json.loads(record.read_text()).get("ablations", {})
        header = ["metric", "run"] + [f"truth up to {s}" for s in ablations]
        rows = [[m, f"{values.get(m, float('nan')):.4g}"] + [f"{a.get(m, float('nan')):.4g}" for a in ablations.values()]
                for m in _ABLATION_METRICS]
        parts.append(_table(rows, header))
    return parts


def build_report(run_dir: str | Path) -> Path:
    """Write ``RUN_DIR/report.html`` from the run's published files and return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        from twin.errors import InputFileError

        raise InputFileError(run_dir, "not a run directory")
    parts = [f"<h1>twin run: {html.escape(run_dir.name)}</h1>"]

    scenario = run_dir / "scenario.toml"
    parts.append("<h2>Scenario</h2>")
    parts.append(f"<pre>{html.escape(scenario.read_text())}</pre>" if scenario.exists() else _missing("scenario.toml"))

    parts.append("<h2>Electrochemistry and schedule</h2>")
    timeline = run_dir / "timeline.png"
    parts.append(f'<img alt="timeline" src="{_img_file(timeline)}">' if timeline.exists() else _missing("timeline.png"))
    schedule = run_dir / "schedule.csv"
    if schedule.exists():
        with open(schedule, newline="") as fh:
            rows = list(csv.reader(fh))
        parts.append(_table(rows[1:], rows[0]) if rows else _missing("schedule rows"))
    else:
        parts.append(_missing("schedule.csv"))

    parts.append("<h2>Per scan: truth, reconstruction, segmentation</h2>")
    scans = _scan_dirs(run_dir)
    shown = 0
    for scan_dir in scans:
        fig = _slices_figure(scan_dir)
        if fig:
            parts.append(f'<img alt="slices {scan_dir.name}" src="{fig}">')
            shown += 1
    if not shown:
        parts.append(_missing("per-scan volumes"))

    for name, title in (("strain.png", "Strain maps"), ("voi_strain.png", "VOI strain over time (Fig S12)"),
                        ("trajectories.png", "Particle trajectories (Fig S9)"), ("resolution.png", "Resolution (Fig S8)")):
        parts.append(f"<h2>{title}</h2>")
        path = run_dir / name
        parts.append(f'<img alt="{name}" src="{_img_file(path)}">' if path.exists() else _missing(name))

    metrics = run_dir / "metrics.json"
    if metrics.exists():
        values = json.loads(metrics.read_text())
        budget = {k: v for k, v in values.items() if k.startswith("budget.")}
        parts.append("<h2>Error budget: which stage is responsible</h2>")
        parts.extend(_budget_section(run_dir, values, budget) if budget else [_missing("error budget (validation.error_budget)")])
        parts.append("<h2>Metrics against the truth</h2>")
        rows = [[k, f"{v:.4g}" if isinstance(v, float) else str(v)] for k, v in sorted(values.items()) if k not in budget]
        parts.append(_table(rows, ["metric", "value"]))
    else:
        parts.append("<h2>Metrics against the truth</h2>")
        parts.append(_missing("metrics.json"))

    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
             "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #bbb;padding:2px 6px}"
             "img{max-width:100%;display:block;margin:0.5em 0}.missing{color:#a00}pre{background:#f4f4f4;"
             "max-height:20em;overflow:auto;font-size:11px}")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>twin report {html.escape(run_dir.name)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
    with atomic_path(run_dir / "report.html") as tmp:
        tmp.write_text(page, encoding="utf-8")
    return run_dir / "report.html"
