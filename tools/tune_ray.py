"""`postdiff tune --ray`: candidates' fidelity on Ray workers, for when one machine is too slow.

Fidelity can be measured wherever the bundle runs; latency cannot (it comes from the device
profile, and ``measured_ms`` is still taken by the tuner's own process, never on a worker). So only
:func:`postdiff.tools.tune.evaluate_fidelity`'s scoring moves to the cluster:

- One Ray **task** generates the baseline's images of the calibration requests (the reference);
  they stay in Ray's object store.
- ``workers`` Ray **actors** (:class:`FidelityWorker`) each open the bundle once, verify its sha256
  and take the reference, then score one candidate after another with the same
  :class:`postdiff.tools.tune.Evaluator` the local worker pool uses, returning numbers only.
- This process hands out candidates and appends each result to the tune cache the moment it
  arrives. Workers never write the cache, so an interrupted run (Ctrl-C, a lost cluster) leaves
  exactly the finished candidates in it, and a re-run -- locally or on another cluster -- computes
  only the rest.

Failures: a worker that dies (killed, out of memory, its node lost) loses only the candidate it was
scoring; that candidate goes back to the front of the queue for another worker, a fresh worker
replaces the dead one, and since a result is recorded only when it arrives, nothing is counted
twice. A candidate whose worker dies more than ``retries`` times stops the run
(:class:`ClusterError`); an error raised by the scoring itself (e.g. a bundle that fails its check
on a worker) stops it at once. Ctrl-C kills the workers, disconnects, and re-raises.

How the bundle reaches the workers (``bundle``):

- ``shared`` (default): every worker opens the bundle at the path the tuner was given (absolute), so
  it must be mounted at that same path on every node (NFS, a copy at the same place).
- ``store``: the tuner puts the manifest and every file it names into Ray's object store once; each
  node writes them into ``$TMPDIR/postdiff-ray-bundles/<manifest sha256>/`` once (written in a
  staging folder and renamed, so a killed worker leaves no half bundle) and its workers open that.
  The object store must hold the bundle (``ray start --object-store-memory``).

Either way each worker checks every file against the manifest's sha256 and the manifest against the
tuner's (:meth:`BundleSource.open`) before it scores anything.

This module imports Ray only inside the functions that need it: Ray is the ``[distributed]`` extra,
and ``postdiff.runtime`` never imports it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from postdiff.errors import BundleError, ClusterError, InputError, PostdiffError
from postdiff.runtime.manifest import MANIFEST_NAME, bundle_files, load_manifest
from postdiff.runtime.schedule import Schedule

LOCAL = "local"  # --ray without an address: start a Ray instance on this machine
TRANSPORTS = ("shared", "store")
STORE_DIR = "postdiff-ray-bundles"  # under the node's temporary folder, for --ray-bundle store
POLL_S = 0.5  # the longest this process waits on Ray at once, so that Ctrl-C is handled promptly

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayOptions:
    """Where and how `postdiff tune --ray` scores candidates."""

    address: str = LOCAL  # "local": start an instance here; "auto", "HOST:PORT" or "ray://HOST:PORT": join one
    bundle: str = "shared"  # "shared": workers open the same path; "store": shipped through the object store
    workers: int | None = None  # actors; None: as many as the cluster's CPUs hold at ``cpus`` each
    cpus: int | None = None  # CPUs (and ONNX Runtime threads) per worker; None: cluster CPUs // workers, else 1
    retries: int = 3  # how often one candidate is handed to a new worker after its worker died


@dataclass(frozen=True)
class BundleSource:
    """How a worker finds the tuner's bundle: a path it can see, or the files in the object store."""

    digest: str  # sha256 of the tuner's manifest (tools.profiler.manifest_digest)
    path: str | None = None  # ``shared``: the bundle folder, absolute
    files: tuple[tuple[str, Any], ...] = ()  # ``store``: (file name in the bundle, ObjectRef of its bytes)

    def open(self) -> Path:
        """The bundle folder on this worker, after checking every file's sha256 and the manifest.

        Raises:
            BundleError: a missing or corrupted file, or a bundle other than the tuner's.
        """
        from postdiff.tools.profiler import manifest_digest

        path = Path(self.path) if self.path is not None else self._materialize()
        try:
            manifest = load_manifest(path, verify=True)
        except BundleError as exc:
            if self.path is not None:
                raise
            raise BundleError(f"{exc} (in the object-store copy on Ray worker {os.uname().nodename}: delete {path} "
                              "there and re-run)") from None
        found = manifest_digest(manifest)
        if found != self.digest:
            raise BundleError(
                f"the bundle at {path} on Ray worker {os.uname().nodename} is not the tuner's bundle (manifest "
                f"sha256 {found[:12]}, expected {self.digest[:12]}); mount the same bundle at that path on "
                "every node, or pass --ray-bundle store to ship it through Ray's object store")
        return path

    def _materialize(self) -> Path:
        import ray

        root = Path(tempfile.gettempdir()) / STORE_DIR
        final = root / self.digest[:32]
        if (final / MANIFEST_NAME).is_file():  # another worker of this node wrote it
            return final
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
        try:
            for name, ref in self.files:
                target = staging / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(ray.get(ref))
            try:
                os.rename(staging, final)  # atomic: a folder there is always complete
            except OSError:  # another worker of this node renamed its copy first
                if not (final / MANIFEST_NAME).is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return final


class FidelityWorker:
    """A Ray actor: opens the bundle once, then scores candidates with :class:`tune.Evaluator`."""

    def __init__(self, source: BundleSource, requests: list, reference_images: list, scheduler: str, judged: bool,
                 threads: int) -> None:
        from postdiff.runtime.pipeline import Pipeline
        from postdiff.tools.tune import Evaluator

        self.error: Exception | None = None
        try:
            pipeline = Pipeline(source.open(), verify=False, threads=threads)  # open() verified the files
            self.evaluator = Evaluator(pipeline, requests, reference_images, scheduler, judged)
        except Exception as exc:  # raised from evaluate instead, as the task error the tuner reports
            self.error = exc

    def evaluate(self, schedule: Schedule) -> dict:
        """The scores of ``schedule`` (see :meth:`tune.Evaluator.evaluate`)."""
        if self.error is not None:
            raise self.error
        return self.evaluator.evaluate(schedule)


def reference_images(source: BundleSource, reference: Schedule, requests: list, scheduler: str,
                     threads: int) -> list:
    """The baseline's images of ``requests`` (run as a Ray task)."""
    from postdiff.runtime.pipeline import Pipeline
    from postdiff.tools.evaluate import generate_set

    pipeline = Pipeline(source.open(), verify=False, threads=threads)
    return generate_set(pipeline, reference, requests, scheduler, progress=False).images


def import_ray() -> Any:
    """The ``ray`` module, or an InputError that says how to install it."""
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs Ray, which is not installed; pip install 'postdiff[distributed]' on this "
                         "machine and on every node of the cluster") from None
    return ray


def connect(ray: Any, address: str) -> bool:
    """Connect this process to Ray (unless it already is); True when this call did, so that the
    caller disconnects (and stops the local instance it started)."""
    if ray.is_initialized():
        return False
    try:
        if address == LOCAL:
            # a local instance: asks Ray to use the loopback node address (Ray may still report and bind the
            # host's own interface address for its control service)
            ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                     _node_ip_address="127.0.0.1")
        else:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise InputError(f"--ray {address}: cannot connect to a Ray cluster ({str(exc).splitlines()[0]}); pass the "
                         "address of a running head node (HOST:6379 or ray://HOST:10001, see `ray start --head`), "
                         "`auto` for the cluster this machine belongs to, or no address for a local instance") from None
    return True


def alive_cpus(ray: Any) -> list[int]:
    """The CPU count of every live node of the connected cluster."""
    return [int(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]


def plan(ray: Any, options: RayOptions, candidates: int) -> tuple[int, int]:
    """(workers, CPUs per worker) for ``options`` on the connected cluster, workers capped at what
    its nodes can hold (an actor that cannot be placed would hold its candidate forever)."""
    node_cpus = alive_cpus(ray)
    total = sum(node_cpus)
    if total < 1:
        raise ClusterError("the Ray cluster has no CPUs; add a node with `ray start --address HEAD --num-cpus N`")
    # By default the workers share the cluster's CPUs equally, a worker at most a whole node.
    cpus = options.cpus or (max(1, min(max(node_cpus), total // options.workers)) if options.workers else 1)
    capacity = sum(n // cpus for n in node_cpus)
    if capacity < 1:
        raise InputError(f"--ray-cpus {cpus}: no node of the Ray cluster has that many CPUs (the largest has "
                         f"{max(node_cpus)}); ask for at most {max(node_cpus)}")
    workers = options.workers or capacity
    if workers > capacity:
        log.warning("--workers %d: the Ray cluster holds only %d workers of %d CPUs; using %d", workers, capacity,
                    cpus, capacity)
        workers = capacity
    return max(1, min(workers, candidates)), cpus


def bundle_source(ray: Any, bundle: Path, digest: str, transport: str) -> BundleSource:
    """The :class:`BundleSource` of ``bundle`` for ``transport`` (``store`` puts its files into Ray)."""
    if transport not in TRANSPORTS:
        raise InputError(f"--ray-bundle '{transport}' is not one of {list(TRANSPORTS)}")
    bundle = Path(bundle).resolve()
    if transport == "shared":
        return BundleSource(digest=digest, path=str(bundle))
    names = [MANIFEST_NAME, *sorted(bundle_files(load_manifest(bundle, verify=False)))]
    return BundleSource(digest=digest, files=tuple((name, ray.put((bundle / name).read_bytes())) for name in names))


def ray_fidelity(bundle: Path, digest: str, todo: Sequence[Schedule], reference: Schedule, requests: list,
                 scheduler: str, judged: bool, options: RayOptions) -> Iterator[tuple[Schedule, dict]]:
    """(schedule, scores) for every schedule of ``todo``, each exactly once, as Ray workers finish them.

    Connects on the first ``next()``; closing the iterator (or an error, or Ctrl-C) kills the
    workers and disconnects what it connected.

    Raises:
        InputError: Ray missing, or the cluster unreachable.
        ClusterError: a candidate whose worker died more than ``options.retries`` times.
        PostdiffError: what scoring raised on a worker (e.g. BundleError: the bundle failed its check).
    """
    ray = import_ray()
    from ray.exceptions import RayActorError, RayTaskError

    connected = connect(ray, options.address)
    actors: list[Any] = []
    try:
        workers, cpus = plan(ray, options, len(todo))
        source = bundle_source(ray, bundle, digest, options.bundle)
        task = ray.remote(num_cpus=cpus, max_retries=options.retries)(reference_images)
        images = task.remote(source, reference, list(requests), scheduler, cpus)
        _await(ray, [images], RayTaskError)  # surfaces a failing bundle check once, before any actor starts
        worker_class = ray.remote(FidelityWorker).options(num_cpus=cpus, max_restarts=0, max_task_retries=0)

        def spawn() -> Any:
            actor = worker_class.remote(source, list(requests), images, scheduler, judged, cpus)
            actors.append(actor)
            return actor

        idle = deque(spawn() for _ in range(workers))
        live = workers
        queue = deque(todo)
        running: dict[Any, tuple[Any, Schedule]] = {}  # result ref -> (actor, schedule)
        deaths: Counter[str] = Counter()
        while queue or running:
            while queue and idle:
                actor, schedule = idle.popleft(), queue.popleft()
                running[actor.evaluate.remote(schedule)] = (actor, schedule)
            ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_S)
            for ref in ready:
                actor, schedule = running.pop(ref)
                try:
                    scores = ray.get(ref)
                except RayTaskError as exc:  # scoring raised: the same error on any worker
                    _reraise(exc)
                except RayActorError as exc:  # the worker died: its candidate goes to another one
                    deaths[schedule.name] += 1
                    if deaths[schedule.name] > options.retries:
                        raise ClusterError(
                            f"candidate {schedule.name}: its Ray worker died {deaths[schedule.name]} times (last: "
                            f"{str(exc).splitlines()[0]}); check the workers' memory (`ray status`, the raylet "
                            "logs), or raise --ray-cpus to give each worker more of a node") from None
                    log.warning("Ray worker died while scoring %s; retrying it on another worker", schedule.name)
                    queue.appendleft(schedule)
                    ray.kill(actor, no_restart=True)
                    live -= 1
                    # A replacement only where the cluster still holds one (a node may be gone with the
                    # worker): an actor that cannot be placed would hold its candidate forever.
                    if live < sum(n // cpus for n in alive_cpus(ray)):
                        idle.append(spawn())  # live idle workers (at the front) take the candidate first
                        live += 1
                    elif live == 0:
                        raise ClusterError(f"every Ray worker is gone and the cluster holds no new one of {cpus} "
                                           "CPUs; restart the nodes (`ray status`) and re-run: the cache keeps "
                                           "what was finished") from None
                    continue
                idle.appendleft(actor)
                yield schedule, scores
    finally:
        for actor in actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already dead
                pass
        if connected:
            ray.shutdown()


def _await(ray: Any, refs: list, task_error: type) -> None:
    """Wait for ``refs`` in short polls (Ctrl-C stays prompt); re-raise a task's own error cleanly."""
    pending = list(refs)
    while pending:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
    try:
        ray.get(refs)
    except task_error as exc:
        _reraise(exc)


def _reraise(exc: Exception) -> None:
    """A worker's PostdiffError as itself (one line for the CLI); anything else with Ray's traceback."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, PostdiffError):
        raise cause from None
    raise exc
