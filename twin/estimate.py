"""What a scenario will cost: peak memory, disk and time, before anything runs.

Memory is counted structurally, in bytes per voxel or per detector pixel that
each stage holds at its peak (the arrays are known from the data contracts).
Time is a cost model: operation counts of each stage (voxels × projections for
projection and backprojection, FFT sizes for propagation, window voxels ×
iterations for DIC, pixels × epochs × filters for training) times a throughput
per core measured on a 2-core x86-64 CPU. It is an order-of-magnitude
guide for planning, not a promise: ``twin bench`` measures the real figures.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from twin.scenario import Scenario

# Seconds per elementary operation on one core of the reference CPU (see module docstring).
_S_PER_VOXEL_PHANTOM = 3e-7  # generation + warping, per voxel per scan
_S_PER_RAY_STEP = 2e-9  # ASTRA CPU forward/back projection, per voxel per projection
_S_PER_FFT_POINT = 2e-8  # padded complex FFT propagation, per (padded) pixel per projection and distance
_S_PER_DIC_VOXEL_ITER = 3e-8  # spam LDIC: per window voxel per iteration
_DIC_ITERATIONS = 20  # typical iterations to convergence of a node
_S_PER_UNET_PIXEL_EPOCH = 4e-6  # forward+backward per pixel per epoch at 16 base filters, depth 4
# Measured ÷ operation-count model per stage on a whole `quickstart` run (150×128×128 voxels, 400 projections,
# 10 scans; this 2-core machine, partly loaded, 2026-11-26; `python benchmarks/scaling.py RUN_DIR`): what the
# counts above leave out (I/O, checksums, Python per slice and per node, padding, retries, TensorFlow start-up).
# Stages whose time grows slower than their size (segmentation, DIC: exponent ~0.6 from tiny to quickstart)
# are overestimated at larger sizes by these factors; see docs/scaling.md. truth: re-measured 2026-11-27 after the
# one-pass optics, coarse fold check and write-behind gzip (`twin phantom quickstart --scan Ti` for the 10 scans:
# the truth nodes' seconds sum to 36.5 s; 54.9 s before).
_MEASURED_OVER_MODEL = {"truth": 4.9, "holograms": 10.6, "reconstruction": 5.9, "segmentation": 11.6, "dic": 6.6}


@dataclass
class Estimate:
    """Resource estimate of a scenario."""

    volume_shape: tuple[int, int, int]
    n_scans: int
    memory_bytes: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    disk_bytes: float = 0.0
    cores: int = 1

    @property
    def peak_memory_bytes(self) -> float:
        return max(self.memory_bytes.values())

    @property
    def peak_stage(self) -> str:
        return max(self.memory_bytes, key=self.memory_bytes.get)

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


def expected_scans(sc: Scenario) -> int:
    """Upper estimate of the number of scans: T0, N_max charge scans, discharge timer scans, final scans."""
    p = sc.protocol
    discharge_min = 60.0 / p.discharge_c_rate
    cycle_min = p.scan_interval_min + p.pre_scan_ocv_min + p.scan_duration_min
    return 1 + p.max_charge_scans + int(discharge_min // cycle_min) + p.final_scans


def seconds_per_node(sc: Scenario, *, calibrated: bool = True) -> dict[str, float]:
    """One-core seconds of one node of each modelled stage of the DAG (``truth``, ``holograms``,
    ``reconstruction``, ``segmentation`` and ``dic`` per scan or increment, ``segmentation_training`` once).

    Stages not listed (rehearsal, microstructure, particle labels, scores, composition, tracking, validation) are
    not modelled: at ``quickstart`` size they take a few percent of a run, and less beyond.
    """
    nz, ny, nx = sc.volume_shape
    n_vox = nz * ny * nx
    b, seg, dic = sc.beamline, sc.segmentation, sc.dic
    padded = 4 * b.detector_pixels * nz  # rows × columns of one projection, 2× padding in each direction
    n_dist = len(b.propagation_distances_m)
    half = (dic.window_half_size_px or [max(1, s // 2) for s in dic.node_spacing_px])[-1]
    n_nodes = sum(max(1, (nz // s) * (ny // s) * (nx // s)) for s in dic.node_spacing_px)
    filters_scale = (seg.base_filters / 16) ** 2 * (2 ** (seg.depth - 4))
    n_train_images = seg.n_training_slices * (1 + seg.augmentations_per_slice)
    model = {
        "truth": n_vox * _S_PER_VOXEL_PHANTOM,
        "holograms": b.n_projections * (n_vox * _S_PER_RAY_STEP + n_dist * padded * _S_PER_FFT_POINT),
        "reconstruction": b.n_projections * n_vox * _S_PER_RAY_STEP * 2 + b.n_projections * n_dist * padded * _S_PER_FFT_POINT,
        "segmentation_training": 2 * seg.epochs * n_train_images * math.prod(seg.tile_shape_px) * _S_PER_UNET_PIXEL_EPOCH
        * max(filters_scale, 0.05),
        "segmentation": n_vox * _S_PER_UNET_PIXEL_EPOCH / 3,
        "dic": n_nodes * (2 * half + 1) ** 3 * _DIC_ITERATIONS * _S_PER_DIC_VOXEL_ITER,
    }
    if not calibrated:
        return model
    return {k: v * _MEASURED_OVER_MODEL[k.removesuffix("_training")] for k, v in model.items()}


def estimate(sc: Scenario, cores: int | None = None, *, calibrated: bool = True) -> Estimate:
    """Estimate peak memory per stage, disk and wall time of ``sc`` on ``cores`` cores.

    ``calibrated=False`` gives the bare operation-count model (what ``benchmarks/scaling.py`` compares runs with).
    """
    from pipeline.dic import registration_binning
    from twin.instrument import HOLOGRAM_CHUNK_BYTES, hologram_bytes_per_angle

    nz, ny, nx = sc.volume_shape
    n_vox = nz * ny * nx
    b, seg = sc.beamline, sc.segmentation
    det_px = b.detector_pixels * nz  # rows × columns of one projection
    n_dist = len(b.propagation_distances_m)
    n_scans = expected_scans(sc)
    cores = cores or max(1, sc.run.workers)
    padded = 4 * det_px  # 2× padding in each direction

    mem = {
        # the stage streams phantom.nc and evaluates δ, β where sampled (benchmarks/bench_phantoms.py: 5.96 float32
        # volumes at 256³): the microstructure (phase u1, particle i4, CBD porosity and the mechanism's key f4),
        # the scan's phase u1 and x f4, the coarse inverse, slabs
        "truth": n_vox * 24,
        # δ, β volumes + one chunk of angles' images (streamed to scan.nx: twin.instrument.HOLOGRAM_CHUNK_BYTES)
        # + the padded complex64 spectrum and wave of the projection being propagated
        "holograms": n_vox * 8 + min(HOLOGRAM_CHUNK_BYTES, b.n_projections * hologram_bytes_per_angle(n_dist, det_px))
        + padded * 8 * 2,
        # flats/darks + phase-retrieved slab + output volume (f4) + a slab of sinograms
        "reconstruction": n_vox * 4 * 2 + (b.n_flats + b.n_darks) * det_px * 4 + b.n_projections * b.detector_pixels * 64 * 4,
        # volume + P(Si) averaged over the planes + one plane's prediction + labels (benchmarks/bench_growth.py:
        # 2.1 float32 volumes over the input at 256³) + batch activations (~4 × base filters channels per tile pixel)
        "segmentation": n_vox * 13 + seg.batch_size * math.prod(seg.tile_shape_px) * 4 * seg.base_filters * 4 * 4,
        # two volumes + what the correlation of one pair adds (benchmarks/bench_growth.py, 256³): 13.5 float32
        # volumes when the registration runs at full resolution (spam's whole-volume registration is the peak);
        # binned (dic.registration_max_voxels) 9 bytes per voxel between 128³ and 256³ over a ~240 MB floor of
        # spam's first calls, the texture mask (3 float32 volumes at most) being the peak: 16 counted. The
        # composition after it (residual maps) holds two volumes, a residual, its blur and the mask (~21 bytes
        # per voxel; the deform runs plane by plane, and each residual is written as it is made).
        "dic": n_vox * (8 + (48 if registration_binning(sc.volume_shape, sc.dic.registration_max_voxels) == 1 else 16)),
    }
    per_node = seconds_per_node(sc, calibrated=calibrated)
    sec = {
        "truth": n_scans * per_node["truth"],
        "holograms": n_scans * per_node["holograms"],
        "reconstruction": n_scans * per_node["reconstruction"],
        "segmentation": per_node["segmentation_training"] + n_scans * per_node["segmentation"],
        "dic": (n_scans - 1) * per_node["dic"],
    }
    sec = {k: v / cores for k, v in sec.items()}
    disk = n_scans * (n_vox * (1 + 4 + 4 + 4 + 4 + 12 + 4 + 4 + 1)
                      + (b.n_projections * n_dist + b.n_flats + b.n_darks) * det_px * 2)
    return Estimate(volume_shape=(nz, ny, nx), n_scans=n_scans, memory_bytes=mem, seconds=sec,
                    disk_bytes=disk, cores=cores)


def machine_memory_bytes() -> int:
    """Physical memory available to this process: the smaller of RAM and a cgroup limit."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _human_seconds(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def format_estimate(est: Estimate) -> str:
    """A short table for ``twin check``."""
    nz, ny, nx = est.volume_shape
    lines = [
        f"# estimate (order of magnitude; `twin bench` measures): volume {nz}×{ny}×{nx} voxels, up to {est.n_scans} scans, {est.cores} core(s)",
        f"# {'stage':<15}{'peak memory':>14}{'time':>12}",
    ]
    for stage in est.memory_bytes:
        lines.append(f"# {stage:<15}{_human_bytes(est.memory_bytes[stage]):>14}{_human_seconds(est.seconds.get(stage, 0)):>12}")
    lines.append(f"# {'total':<15}{_human_bytes(est.peak_memory_bytes):>14}{_human_seconds(est.total_seconds):>12}"
                 f"   (peak: {est.peak_stage}; disk ~{_human_bytes(est.disk_bytes)})")
    return "\n".join(lines)
