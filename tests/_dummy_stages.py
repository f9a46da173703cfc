"""Dummy stages for runner tests: each execution leaves a marker file so counts survive processes."""

from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid
from pathlib import Path

import numpy as np

from twin.runner import Stage, StageContext

COUNTER_ENV = "TWIN_TEST_COUNTER_DIR"


def _count(ctx: StageContext) -> None:
    counter = Path(os.environ[COUNTER_ENV])
    counter.mkdir(parents=True, exist_ok=True)
    (counter / f"{ctx.stage}-{ctx.item or ''}-{uuid.uuid4().hex}").touch()


def executions(counter: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for f in counter.glob("*-*-*"):
        stage, item, _ = f.name.split("-")
        name = f"{stage}[{item}]" if item else stage
        counts[name] = counts.get(name, 0) + 1
    return counts


def compute_source(ctx: StageContext) -> None:
    _count(ctx)
    values = ctx.rng.normal(size=16) * ctx.scenario.sample.voxel_size_um
    np.save(ctx.out_dir / "values.npy", values)


def compute_scaled(ctx: StageContext) -> None:
    _count(ctx)
    values = np.load(ctx.input("source") / "values.npy")
    np.save(ctx.out_dir / "scaled.npy", values * ctx.scenario.reconstruction.delta_beta)
    (ctx.out_dir / "meta.json").write_text(json.dumps({"item": ctx.item}))


def compute_noise(ctx: StageContext) -> None:
    _count(ctx)
    scaled = np.load(ctx.input("scaled", ctx.item) / "scaled.npy")
    np.save(ctx.out_dir / "noisy.npy", scaled + ctx.rng.normal(size=scaled.shape))


def compute_summary(ctx: StageContext) -> None:
    _count(ctx)
    total = sum(float(np.load(p / "noisy.npy").sum()) for (s, i), p in sorted(ctx.inputs.items(), key=str))
    (ctx.out_dir / "summary.json").write_text(json.dumps({"total": total}))


def compute_slow_writer(ctx: StageContext) -> None:
    """Writes half a file, then waits to be killed."""
    _count(ctx)
    with open(ctx.out_dir / "big.bin", "wb") as fh:
        fh.write(b"\x01" * 100_000)
        fh.flush()
        Path(os.environ[COUNTER_ENV], "writing").touch()
        time.sleep(60)
        fh.write(b"\x02" * 100_000)


ITEMS = ["T0", "T1", "T2"]


def dummy_stages(slow: bool = False) -> list[Stage]:
    """source (reads sample.voxel_size_um) -> scaled (reads reconstruction.delta_beta) -> noise per item -> summary."""
    return [
        Stage("source", 1, ("sample.voxel_size_um",), compute_slow_writer if slow else compute_source),
        Stage("scaled", 1, ("reconstruction.delta_beta",), compute_scaled,
              needs=lambda item, r: [("source", None)], items=lambda r: ITEMS),
        Stage("noise", 1, ("beamline.exposure_s",), compute_noise,
              needs=lambda item, r: [("scaled", item)], items=lambda r: ITEMS),
        Stage("summary", 1, (), compute_summary, needs=lambda item, r: [("noise", i) for i in ITEMS]),
    ]


def compute_chunked(ctx: StageContext) -> None:
    """Writes its output in several flushed chunks with pauses, so a SIGKILL can land mid-write."""
    _count(ctx)
    rng = np.random.default_rng([ctx.scenario.run.seed, len(ctx.inputs)])
    upstream = sum((np.load(p / "chunk.npy") for _, p in sorted(ctx.inputs.items(), key=str)), np.zeros(64))
    np.save(ctx.out_dir / "chunk.npy", upstream + ctx.rng.normal(size=64))
    with open(ctx.out_dir / "payload.bin", "wb") as fh:
        for _ in range(4):
            fh.write(rng.bytes(50_000))
            fh.flush()
            time.sleep(0.02)


def chunked_stages() -> list[Stage]:
    """A ten-node DAG of slow, chunked writers (source -> a[T0..T2] -> b[T0..T2] -> c[T0..T2] -> summary-like join)."""
    return [
        Stage("source", 1, ("sample.voxel_size_um",), compute_chunked),
        Stage("a", 1, ("reconstruction.delta_beta",), compute_chunked,
              needs=lambda item, r: [("source", None)], items=lambda r: ITEMS),
        Stage("b", 1, ("beamline.exposure_s",), compute_chunked,
              needs=lambda item, r: [("a", item)], items=lambda r: ITEMS),
        Stage("join", 1, (), compute_chunked, needs=lambda item, r: [("b", i) for i in ITEMS]),
    ]


def compute_stalling_once(ctx: StageContext) -> None:
    """The first execution anywhere records its process id and stalls (to be killed); later ones run normally."""
    marker = Path(os.environ[COUNTER_ENV]) / "stalled"
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(os.getpid()))
        time.sleep(60)
    compute_chunked(ctx)


def stalling_stages() -> list[Stage]:
    """:func:`chunked_stages` whose ``a`` nodes stall once, for killing the process that runs them."""
    stages = chunked_stages()
    stages[1] = dataclasses.replace(stages[1], compute=compute_stalling_once)
    return stages


def compute_timed(ctx: StageContext) -> None:
    """Sleeps 1 s and records when it ran (``interval_<key>.json`` in the counter directory)."""
    _count(ctx)
    start = time.time()
    time.sleep(1.0)
    (Path(os.environ[COUNTER_ENV]) / f"interval_{ctx.key[:12]}.json").write_text(json.dumps([start, time.time()]))
    (ctx.out_dir / "done.json").write_text("{}")


def intervals(counter: Path) -> list[tuple[float, float]]:
    """When each :func:`compute_timed` node ran (start, end), in start order."""
    return sorted(tuple(json.loads(f.read_text())) for f in counter.glob("interval_*.json"))


def timed_stages() -> list[Stage]:
    """One node per point, reading the field a sweep varies: the points share nothing."""
    return [Stage("timed", 1, ("reconstruction.delta_beta",), compute_timed)]


def compute_scaled_diverging_at_200(ctx: StageContext) -> None:
    """:func:`compute_scaled`, except that it fails (as an unconverged DIC would) when δ/β is 200."""
    if ctx.scenario.reconstruction.delta_beta == 200:
        raise RuntimeError("diverged at delta_beta 200")
    compute_scaled(ctx)


def diverging_stages() -> list[Stage]:
    """:func:`dummy_stages` whose ``scaled`` nodes fail at δ/β = 200."""
    stages = dummy_stages()
    stages[1] = dataclasses.replace(stages[1], compute=compute_scaled_diverging_at_200)
    return stages
