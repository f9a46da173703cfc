"""The cached stage runner.

A run is a DAG of *nodes*: a stage applied to one item (a scan name such as
``"T3"``, or ``None`` for a stage that runs once). Each node's output is a
directory in the cache under the key

    key = sha256(stage name, stage version, item, values of the scenario
                 fields the stage reads, keys of its input nodes)

so the key is known before anything runs, a rerun reuses every node whose key
is unchanged, and changing one field recomputes exactly the nodes downstream
of it.

Writing is atomic: a node computes into ``<stage>/.tmp-<key>-<random>/``, the
runner records every file's size and SHA-256 in ``manifest.json`` (with
provenance: the resolved scenario, package versions, git revision, seed) and
renames the directory to ``<stage>/<key>/``. An entry whose manifest is missing
or whose files do not match their checksums (a killed write, a flipped byte, a
truncated file) is never trusted: it is removed and recomputed.

Randomness: :attr:`StageContext.rng` is seeded from ``run.seed``, the stage
name and the item, not from the content key, so a sweep over, say, δ/β reuses
the same noise realization at every point (common random numbers) and the
parameter's effect is not confounded with a new draw.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from twin.errors import StageError, StageNotAvailable, TwinError
from twin.scenario import Scenario

log = logging.getLogger("twin.runner")

Node = tuple[str, str | None]
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Stage:
    """One step of the twin.

    Parameters
    ----------
    name
        Unique stage name (``"holograms"``).
    version
        Bump it whenever the stage's code changes its output: old cache entries
        then stop matching.
    reads
        Dotted scenario fields (or whole sections: ``"beamline"``) the output depends on.
    compute
        ``compute(ctx)`` writes the stage's files into ``ctx.out_dir``. A
        module-level function, so a Dask worker can import it.
    needs
        ``needs(item, runner)`` returns the input nodes of ``(name, item)``;
        it may ask the runner for a finished upstream output (e.g. the list of
        scans from the schedule).
    items
        ``items(runner)`` lists the items of a per-item stage; ``None`` for a
        stage that runs once.
    """

    name: str
    version: int
    reads: tuple[str, ...]
    compute: Callable[[StageContext], None]
    needs: Callable[[str | None, Runner], list[Node]] = lambda item, runner: []
    items: Callable[[Runner], list[str]] | None = None


@dataclass
class StageContext:
    """What a stage's ``compute`` sees: the scenario, its inputs and where to write."""

    stage: str
    item: str | None
    scenario: Scenario
    out_dir: Path
    inputs: dict[Node, Path]
    seed: int
    key: str

    @property
    def rng(self) -> np.random.Generator:
        """A generator for this node alone, from ``run.seed``, the stage name and the item."""
        return np.random.default_rng(node_seed_sequence(self.seed, self.stage, self.item))

    def input(self, stage: str, item: str | None = None) -> Path:
        """The output directory of an input node."""
        try:
            return self.inputs[(stage, item)]
        except KeyError:
            raise StageError(f"stage {self.stage!r} did not declare input {(stage, item)!r}") from None


def node_seed_sequence(seed: int, stage: str, item: str | None) -> np.random.SeedSequence:
    """The SeedSequence of one node: run seed, spawned by (stage, item)."""
    return np.random.SeedSequence(entropy=seed, spawn_key=(zlib.crc32(stage.encode()), zlib.crc32((item or "").encode())))


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def provenance(scenario: Scenario) -> dict[str, Any]:
    """Versions, git revision and scenario that a cache entry records."""
    from importlib import metadata

    versions = {}
    for pkg in ("twin-holotomo", "numpy", "scipy", "xarray", "pybamm", "simpy", "spam", "nabu", "astra-toolbox",
                "tensorflow-cpu", "keras", "scikit-image", "xraylib"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return {"scenario": scenario.model_dump(mode="json"), "versions": versions, "git_revision": git_revision(),
            "seed": scenario.run.seed}


def git_revision() -> str | None:
    """The source tree's git revision, read from .git without running git; None outside a checkout."""
    root = Path(__file__).resolve().parent.parent / ".git"
    try:
        head = (root / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = head[5:]
            ref_file = root / ref
            if ref_file.exists():
                return ref_file.read_text().strip()
            packed = root / "packed-refs"
            for line in packed.read_text().splitlines() if packed.exists() else []:
                if line.endswith(" " + ref):
                    return line.split()[0]
            return None
        return head
    except OSError:
        return None


class Cache:
    """Content-addressed, atomically written stage outputs under one root."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def entry(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def is_valid(self, stage: str, key: str) -> bool:
        """True when the entry exists and every file matches its recorded size and checksum."""
        path = self.entry(stage, key)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            if manifest.get("key") != key:
                return False
            listed = manifest["files"]
            present = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()} - {MANIFEST}
            if present != set(listed):
                return False
            for rel, meta in listed.items():
                f = path / rel
                if f.stat().st_size != meta["size"] or file_sha256(f) != meta["sha256"]:
                    return False
            return True
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def new_tmp(self, stage: str, key: str) -> Path:
        tmp = self.root / stage / f".tmp-{key[:16]}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, stage: str, key: str, tmp: Path, meta: dict[str, Any]) -> Path:
        """Checksum the files of ``tmp``, write its manifest, and rename it into place."""
        files = {}
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            files[str(f.relative_to(tmp))] = {"size": f.stat().st_size, "sha256": file_sha256(f)}
            _fsync(f)
        manifest = dict(meta, key=key, files=files)
        with open(tmp / MANIFEST, "w") as fh:
            json.dump(manifest, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        final = self.entry(stage, key)
        if final.exists():
            if self.is_valid(stage, key):  # another process finished the same node first
                shutil.rmtree(tmp, ignore_errors=True)
                return final
            self.discard(stage, key)
        try:
            os.rename(tmp, final)
        except OSError:
            if not self.is_valid(stage, key):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        _fsync(final.parent)
        return final

    def discard(self, stage: str, key: str) -> None:
        """Move an untrusted entry aside, then delete it (rename first: never leave it half-deleted at its name)."""
        path = self.entry(stage, key)
        trash = path.parent / f".trash-{key[:16]}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, trash)
        except FileNotFoundError:  # absent, or another process discarded it first
            return
        shutil.rmtree(trash, ignore_errors=True)

    def sweep_tmp(self, older_than_s: float = 0.0) -> int:
        """Remove leftovers of killed writes. Returns how many were removed."""
        removed = 0
        now = time.time()
        for pattern in (".tmp-*", ".trash-*"):
            for p in self.root.glob(f"*/{pattern}"):
                try:
                    if now - p.stat().st_mtime >= older_than_s:
                        shutil.rmtree(p, ignore_errors=True)
                        removed += 1
                except OSError:
                    continue
        return removed


def recorded_seconds(entry: str | Path) -> float:
    """Seconds a cache entry took when it was computed (its manifest), whichever run computed it; 0 if unreadable."""
    try:
        return float(json.loads((Path(entry) / MANIFEST).read_text()).get("seconds", 0.0))
    except (OSError, ValueError, TypeError):
        return 0.0


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass
class NodeReport:
    """What happened to one node in a run."""

    stage: str
    item: str | None
    key: str
    status: str  # "reused" | "computed"
    seconds: float
    path: Path


@dataclass
class Runner:
    """Runs stages of a scenario through the cache.

    Parameters
    ----------
    scenario
        The validated scenario.
    stages
        The DAG, as stages that name their inputs.
    cache_dir
        Root of the cache; shared between runs and sweep points.
    force
        Stage names to recompute even when their entries are valid.
    executor
        Where nodes run (:func:`twin.parallel.executor`): each is submitted as
        soon as its inputs are done; ``None`` runs them here, in turn.
    progress
        ``progress(report)`` is called after each node.
    """

    scenario: Scenario
    stages: Sequence[Stage]
    cache_dir: Path
    force: Iterable[str] = ()
    executor: Any = None
    progress: Callable[[NodeReport], None] | None = None
    reports: list[NodeReport] = field(default_factory=list)

    def __post_init__(self):
        self.cache = Cache(self.cache_dir)
        self.by_name = {s.name: s for s in self.stages}
        unknown = set(self.force) - set(self.by_name)
        if unknown:
            raise StageError(f"--force: unknown stage(s) {sorted(unknown)}; stages are {sorted(self.by_name)}")
        self._keys: dict[Node, str] = {}
        self._config = self.scenario.model_dump(mode="json")
        self._done: dict[Node, Path] = {}
        self._forced_done: set[Node] = set()
        self.cache.sweep_tmp(older_than_s=3600)

    # Keys ---------------------------------------------------------------------------
    def key(self, node: Node) -> str:
        """The content key of a node (computing its inputs' keys, never their outputs, unless ``needs`` asks)."""
        if node not in self._keys:
            stage = self._stage(node[0])
            fields = {f: self.scenario.get(f, self._config) for f in stage.reads}
            inputs = [self.key(n) for n in stage.needs(node[1], self)]
            # The seed is in every key: any stage may draw from ctx.rng.
            self._keys[node] = _digest({"stage": stage.name, "version": stage.version, "item": node[1],
                                        "seed": self.scenario.run.seed, "fields": fields, "inputs": inputs})
        return self._keys[node]

    def _stage(self, name: str) -> Stage:
        try:
            return self.by_name[name]
        except KeyError:
            raise StageError(f"unknown stage {name!r}; stages are {sorted(self.by_name)}") from None

    def items(self, stage: str) -> list[str | None]:
        s = self._stage(stage)
        return [None] if s.items is None else list(s.items(self))

    # Execution ----------------------------------------------------------------------
    def output(self, stage: str, item: str | None = None) -> Path:
        """The output directory of one node, computing it (and what it needs) if necessary."""
        return self.run([(stage, item)])[(stage, item)]

    def run(self, targets: Iterable[Node]) -> dict[Node, Path]:
        """Bring every target node (and its inputs) up to date; return their output directories."""
        return run_together([(self, list(targets))], self.executor)[0]

    def _job(self, node: Node) -> tuple:
        stage = self._stage(node[0])
        inputs = {n: self._done[n] for n in stage.needs(node[1], self)}
        return (stage, node[1], self.scenario, str(self.cache.root), self.key(node), inputs,
                node[0] in self.force)

    def _finish(self, report: NodeReport) -> None:
        self._done[(report.stage, report.item)] = report.path
        self.reports.append(report)
        log.info("%s %s[%s] %s", report.status, report.stage, report.item or "-", report.key[:12])
        if self.progress is not None:
            self.progress(report)

    def plan(self, targets: Iterable[Node]) -> list[Node]:
        """Every node the targets need, inputs first (what :meth:`run` will reuse or compute)."""
        return self._topological(list(targets))

    def _topological(self, targets: list[Node]) -> list[Node]:
        order: list[Node] = []
        state: dict[Node, int] = {}

        def visit(node: Node, chain: tuple[Node, ...]) -> None:
            if state.get(node) == 2:
                return
            if state.get(node) == 1:
                raise StageError(f"stage cycle: {' -> '.join(f'{s}[{i}]' for s, i in chain + (node,))}")
            state[node] = 1
            for n in self._stage(node[0]).needs(node[1], self):
                visit(n, chain + (node,))
            state[node] = 2
            order.append(node)

        for t in targets:
            visit(t, ())
        return order


def run_together(work: Sequence[tuple[Runner, list[Node]]], executor: Any = None, *,
                 runner_done: Callable[[int], None] | None = None,
                 node_done: Callable[[int, int], None] | None = None,
                 runner_failed: Callable[[int, TwinError], None] | None = None) -> list[dict[Node, Path]]:
    """Bring the targets of several runners up to date at once (a sweep's points), each distinct node once.

    Nodes of different runners with equal stage and key are one node: the
    first runner in ``work`` that needs it reports it ``computed`` (with its
    seconds), the others ``reused``, as if the runners had run one after the
    other. Every node that is not valid in the cache is submitted to
    ``executor`` as soon as its inputs are done, with a higher priority for
    earlier runners: a serial executor finishes the first runner's targets
    first, a Dask cluster runs whatever is ready. The first failure cancels
    what has not started and is raised (finished nodes stay valid in the cache),
    unless ``runner_failed`` is given: then a node that fails with a
    :class:`TwinError` fails only the runners that need it, and the others go on.

    Parameters
    ----------
    work
        ``(runner, targets)`` pairs.
    executor
        :func:`twin.parallel.executor`'s executor; ``None``: in this process.
    runner_done
        ``runner_done(i)`` once every node of ``work[i]`` (its targets and their inputs) is done.
    node_done
        ``node_done(done, total)`` after each distinct node (reused ones included).
    runner_failed
        ``runner_failed(i, error)`` when a node ``work[i]`` needs fails (each
        runner once; nothing that depends on the failed node is run).

    Returns
    -------
    list of dict
        Per runner, the output directory of each of its targets (none for a failed runner).
    """
    from twin.parallel import SerialExecutor

    executor = executor or SerialExecutor()
    users: dict[tuple[str, str], list[tuple[Runner, Node]]] = {}
    inputs: dict[tuple[str, str], set[tuple[str, str]]] = {}
    priority: dict[tuple[str, str], int] = {}
    waiting: list[set[tuple[str, str]]] = []  # per runner: its nodes not done yet
    for index, (runner, targets) in enumerate(work):
        waiting.append(set())
        for node in runner._topological(targets):
            uid = (node[0], runner.key(node))
            if uid not in users:
                inputs[uid] = {(n[0], runner.key(n)) for n in runner._stage(node[0]).needs(node[1], runner)}
                priority[uid] = -index
                users[uid] = []
            users[uid].append((runner, node))
            waiting[index].add(uid)

    done: set[tuple[str, str]] = set()

    def finish(uid, path: Path, seconds: float, status: str) -> None:
        first = True
        for runner, node in users[uid]:
            if node in runner._done:
                continue
            runner._finish(NodeReport(node[0], node[1], uid[1], status if first else "reused",
                                      seconds if first else 0.0, path))
            first = False
        done.add(uid)
        if node_done is not None:
            node_done(len(done), len(users))
        for index, nodes in enumerate(waiting):
            if uid in nodes:
                nodes.discard(uid)
                if not nodes and runner_done is not None:
                    runner_done(index)

    todo: dict[tuple[str, str], bool] = {}  # uid -> forced
    for uid, nodes in users.items():
        stage, key = uid
        if all(node in runner._done for runner, node in nodes):
            finish(uid, nodes[0][0]._done[nodes[0][1]], 0.0, "reused")
            continue
        forced = any(stage in runner.force and node not in runner._forced_done for runner, node in nodes)
        cache = nodes[0][0].cache
        if not forced and cache.is_valid(stage, key):
            finish(uid, cache.entry(stage, key), 0.0, "reused")
            continue
        if cache.entry(stage, key).exists() and not forced:
            log.warning("cache entry %s/%s failed its checksum: recomputing", stage, key[:12])
        todo[uid] = forced

    failed: set[tuple[str, str]] = set()
    failed_runners: set[int] = set()

    def fail(uid, error: TwinError) -> None:
        failed.add(uid)
        for index, nodes in enumerate(waiting):
            if uid in nodes and index not in failed_runners:
                failed_runners.add(index)
                runner_failed(index, error)

    running: dict[Any, tuple[str, str]] = {}
    try:
        while todo or running:
            blocked = [u for u in todo if inputs[u] & failed]
            while blocked:  # an input failed: these never run
                for uid in blocked:
                    del todo[uid]
                    failed.add(uid)
                blocked = [u for u in todo if inputs[u] & failed]
            for uid in [u for u in todo if inputs[u] <= done]:
                runner, node = next((r, n) for r, n in users[uid] if n not in r._done)
                job = list(runner._job(node))
                job[-1] = todo.pop(uid)
                running[executor.submit(_execute, *job, priority=priority[uid])] = uid
            if not running:
                if not todo:
                    break  # what was left depended on failed nodes
                raise StageError(f"nodes whose inputs never finished: {sorted(todo)}")
            for future in executor.first_done(running):
                uid = running.pop(future)
                try:
                    path, seconds = future.result()
                except TwinError as error:
                    if runner_failed is None:
                        raise
                    log.warning("%s[%s] failed: %s", uid[0], users[uid][0][1][1] or "-", error)
                    fail(uid, error)
                    continue
                for runner, node in users[uid]:
                    if node[0] in runner.force:
                        runner._forced_done.add(node)
                finish(uid, Path(path), seconds, "computed")
    except BaseException:
        executor.cancel(running)
        raise
    return [{node: runner._done[node] for node in targets if node in runner._done} for runner, targets in work]


def _execute(stage: Stage, item: str | None, scenario: Scenario, cache_root: str, key: str,
             inputs: dict[Node, Path], forced: bool) -> tuple[str, float]:
    """Compute one node into a temporary directory and commit it (runs in a worker too)."""
    cache = Cache(cache_root)
    if not forced and cache.is_valid(stage.name, key):  # another process got there first
        return str(cache.entry(stage.name, key)), 0.0
    tmp = cache.new_tmp(stage.name, key)
    start = time.perf_counter()
    ctx = StageContext(stage=stage.name, item=item, scenario=scenario, out_dir=tmp, inputs=inputs,
                       seed=scenario.run.seed, key=key)
    try:
        stage.compute(ctx)
    except TwinError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise StageError(f"stage {stage.name!r}{f' [{item}]' if item else ''} failed: {type(exc).__name__}: {exc}") from exc
    seconds = time.perf_counter() - start
    meta = {"stage": stage.name, "version": stage.version, "item": item, "seconds": seconds,
            "fields": {f: scenario.get(f) for f in stage.reads},
            "inputs": {f"{s}[{i}]" if i else s: Path(p).name for (s, i), p in inputs.items()},
            "created_unix": time.time(), "provenance": provenance(scenario)}
    try:
        if forced:
            cache.discard(stage.name, key)
        path = cache.commit(stage.name, key, tmp, meta)
    except OSError as exc:  # disk full, quota, permissions: say where, leave nothing that looks finished
        shutil.rmtree(tmp, ignore_errors=True)
        raise StageError(f"stage {stage.name!r}{f' [{item}]' if item else ''}: could not store its output in the cache "
                         f"{cache.root}: {exc.strerror or exc}") from exc
    return str(path), seconds


def not_built(stage: str, issue: int) -> Callable[[StageContext], None]:
    """The compute function of a stage whose implementation has not landed yet."""

    def compute(ctx: StageContext) -> None:
        raise StageNotAvailable(f"stage {stage!r} is not built yet (issue #{issue}); nothing was computed for it")

    compute.__name__ = f"not_built_{stage}"
    return compute


def publish(path: Path, out_dir: Path) -> list[Path]:
    """Expose a cache entry's files in a run directory (hard links, copies across file systems)."""
    written = []
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST):
        target = out_dir / f.relative_to(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            os.link(f, tmp)
        except OSError:
            shutil.copy2(f, tmp)
        os.replace(tmp, target)
        written.append(target)
    return written
