"""The collection cycle: read NVML on a timer, render once, serve the same bytes to every scrape.

Scrapes never touch NVML: however many Prometheus replicas scrape, NVML is read once per
interval. Each GPU is read on its own worker thread with a deadline; a GPU whose call hangs is
reported as not up, its worker is left to finish (ctypes released the GIL, so only that thread
is blocked) and later cycles skip that GPU until the call returns. Threads stay bounded at one
per GPU plus one for node-wide reads.
"""

from __future__ import annotations

import functools
import gzip
import logging
import platform
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from queue import SimpleQueue
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric

from exporter import __version__
from exporter import catalogue as m
from exporter.attribution import Attribution
from exporter.collectors import Collector, build_families
from exporter.exposition import Sample, render
from exporter.nvml import (
    ErrorKind,
    Gpu,
    GpuLostError,
    Nvml,
    NvmlDownError,
    NvmlStartupError,
    nvml_bindings_version,
)

log = logging.getLogger(__name__)


_STOP = object()  # tells a Worker's thread to end


class Worker:
    """One daemon thread running submitted calls in order; `busy` while a call is in flight.

    Daemon, unlike concurrent.futures' pool threads, so a call wedged in the driver never
    keeps the process from exiting on SIGTERM.
    """

    def __init__(self, name: str) -> None:
        self._tasks: SimpleQueue[Any] = SimpleQueue()
        self._pending: Future[Any] | None = None
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    @property
    def busy(self) -> bool:
        return self._pending is not None and not self._pending.done()

    def submit(self, call: Callable[[], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        self._pending = future
        self._tasks.put((call, future))
        return future

    def stop(self) -> None:
        """End the thread after the call in flight (at once when idle)."""
        self._tasks.put(_STOP)

    def _run(self) -> None:
        while True:
            task = self._tasks.get()
            if task is _STOP:
                return
            call, future = task
            try:
                future.set_result(call())
            except BaseException as error:  # delivered to the waiting cycle, never lost
                future.set_exception(error)


@dataclass
class GpuResult:
    """What one cycle read from one GPU: samples per collector and how long each took."""

    samples: dict[str, list[Sample]] = field(default_factory=dict)
    durations: dict[str, float] = field(default_factory=dict)
    faults: set[str] = field(default_factory=set)
    up: bool = True


class Exporter:
    """Owns NVML, the collectors and the cached exposition; `run_cycle` refreshes it."""

    def __init__(
        self,
        nvml: Nvml,
        collectors: Sequence[Collector],
        *,
        interval: float,
        nvml_timeout: float,
        clock: Callable[[], float] = time.time,
        attribution: Attribution | None = None,
    ) -> None:
        self.nvml = nvml
        self.attribution = attribution
        self.node = nvml.node
        self.collectors = list(collectors)
        self.interval = interval
        self.nvml_timeout = nvml_timeout
        self.clock = clock
        self.gpus: list[Gpu] = []
        self._gpu_up: dict[tuple[str, ...], bool] = {}
        self._workers: dict[int, Worker] = {}
        self._node_worker: Worker | None = None
        self._durations: dict[str, float] = {}
        self._success: dict[str, bool] = {}
        self._cycle_seconds = 0.0
        self.samples_dropped = 0
        self.last_cycle_finished: float | None = None
        self._exposition = b""
        self._exposition_gzip: bytes | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._health = _ExporterHealth(self)
        #: The same families as a prometheus_client registry, for embedding and for tests.
        self.registry = CollectorRegistry(auto_describe=False)
        for collector in self.collectors:
            self.registry.register(collector)
        self.registry.register(self._health)
        self._logged_faults: set[str] = set()

    # -- NVML lifecycle ----------------------------------------------------------------------
    def start_nvml(self) -> None:
        """Open NVML (unless the caller did) and enumerate; NvmlStartupError propagates."""
        if not self.nvml.initialised:
            self.nvml.init()
        self._enumerate()

    def _enumerate(self) -> None:
        self.gpus = self.nvml.enumerate_gpus()
        system = self.nvml.system_info()
        for collector in self.collectors:
            collector.on_enumerate(self.nvml, self.gpus, system)
        log.info(
            "NVML ready: driver %s, CUDA %s, %d GPU(s): %s",
            system.driver_version,
            system.cuda_driver_version,
            len(self.gpus),
            ", ".join(f"{g.index}:{g.model}" for g in self.gpus),
        )

    def _reinitialise(self) -> bool:
        """Try to bring NVML back after the driver went away; True when it answers again."""
        try:
            for collector in self.collectors:
                collector.close(self.nvml)  # event sets and GPM samples of the old session
            self.nvml.reset()
            self.nvml.init()
            self._enumerate()
        except (NvmlStartupError, NvmlDownError) as error:
            log.debug("NVML still down: %s", error)
            self.nvml.initialised = False
            return False
        log.info("NVML re-initialised")
        return True

    def stop(self) -> None:
        """Ask `run_forever` to return after the current cycle (safe from a signal handler)."""
        self._stop.set()

    def close(self, timeout: float = 2.0) -> None:
        """Close NVML, bounded: a wedged driver call cannot hold shutdown for long."""
        self._stop.set()
        for worker in [*self._workers.values(), self._node_worker]:
            if worker is not None:
                worker.stop()
        closer = threading.Thread(target=self._close_nvml, name="nvml-shutdown", daemon=True)
        closer.start()
        closer.join(timeout=timeout)
        if closer.is_alive():
            log.warning("nvmlShutdown did not return within %.0f s; exiting without it", timeout)

    def _close_nvml(self) -> None:
        was_open = self.nvml.initialised
        for collector in self.collectors:
            collector.close(self.nvml)
        if self.nvml.shutdown():
            log.info("NVML shut down")
        elif was_open:
            log.warning("nvmlShutdown failed; the driver releases this process at exit")

    # -- the cycle ---------------------------------------------------------------------------
    def run_forever(self) -> None:
        """Collect every interval until `stop`; a slow cycle delays, never stacks, the next."""
        next_start = time.monotonic()
        while not self._stop.is_set():
            self.run_cycle()
            next_start += self.interval
            delay = next_start - time.monotonic()
            if delay < 0:
                next_start = time.monotonic()
                delay = 0
            self._stop.wait(delay)

    def run_cycle(self) -> None:
        """Read every GPU (each on its worker, with a deadline), then render the exposition."""
        started = time.perf_counter()
        reads = None
        # NVML found down in the middle of a cycle is opened again at once and the cycle read
        # again, so a library that only lost its initialisation costs no interval.
        for attempt in range(2):
            if not self.nvml.initialised and not self._reinitialise():
                break
            try:
                reads = self._read_all()
                break
            except NvmlDownError as error:
                if attempt == 0:
                    log.warning("NVML stopped answering (%s); re-initialising", error)
                self.nvml.initialised = False
        if reads is None:
            self._gpu_up = {labels: False for labels in self._gpu_up}
            for collector in self.collectors:
                collector.samples = []
            self._finish_cycle(started)
            return
        results, node_samples = reads
        for collector in self.collectors:
            samples: list[Sample] = []
            duration = 0.0
            healthy = True
            for result in results.values():
                samples.extend(result.samples.get(collector.name, ()))
                duration += result.durations.get(collector.name, 0.0)
                healthy = healthy and collector.name not in result.faults
            node_part: list[Sample]
            if node_samples is None:  # the node worker is wedged: its collectors failed
                node_part, node_duration, node_ok = [], 0.0, not _reads_node(collector)
            else:
                node_part, node_duration, node_ok = node_samples.get(
                    collector.name, ([], 0.0, True)
                )
            samples.extend(node_part)
            collector.samples = samples
            self._durations[collector.name] = duration + node_duration
            self._success[collector.name] = healthy and node_ok
        self._gpu_up = {gpu.labels: results[gpu.index].up for gpu in self.gpus}
        for index in self.nvml.missing:  # NVML counts it but cannot open it: known, not up
            self._gpu_up[(self.node, str(index), "", "", "")] = False
        self._finish_cycle(started)

    def _read_all(
        self,
    ) -> tuple[dict[int, GpuResult], dict[str, tuple[list[Sample], float, bool]] | None]:
        """This cycle's reads: each GPU, then the node; NvmlDownError when NVML is gone."""
        if self.nvml.missing and self.nvml.missing_came_back():
            log.info("a GPU that could not be opened answers again: enumerating anew")
            self._enumerate()
        return self._read_gpus(), self._read_node()

    def _read_gpus(self) -> dict[int, GpuResult]:
        """Each GPU on its own worker, one after another, each with its own deadline.

        One at a time: eight threads contending for the GIL cost four times the CPU of the
        reads themselves. A hung call costs one deadline in the cycle it starts in; after that
        its worker is busy and the GPU is skipped at once until the call returns.
        """
        results: dict[int, GpuResult] = {}
        for gpu in self.gpus:
            worker = self._workers.get(gpu.index)
            if worker is None:
                worker = self._workers[gpu.index] = Worker(f"nvml-gpu{gpu.index}")
            if worker.busy:
                results[gpu.index] = GpuResult(up=False)  # still wedged: fail fast
                continue
            future = worker.submit(functools.partial(self._read_one_gpu, gpu))
            done, _ = wait_futures([future], timeout=self.nvml_timeout)
            if done:
                self._forget_logged(f"hang:{gpu.index}:")
                results[gpu.index] = future.result()  # raises only NvmlDownError
                continue
            function = self.nvml.in_flight.get(worker.thread.ident or 0, "unknown")
            self.nvml.count_error(function, ErrorKind.TIMEOUT)
            self._log_once(f"hang:{gpu.index}:{function}", f"GPU {gpu.index}: {function} hung")
            results[gpu.index] = GpuResult(up=False)
        return results

    def _read_one_gpu(self, gpu: Gpu) -> GpuResult:
        result = GpuResult()
        for collector in self.collectors:
            began = time.perf_counter()
            try:
                result.samples[collector.name] = collector.read_gpu(self.nvml, gpu)
            except GpuLostError as error:
                self._log_once(f"lost:{gpu.uuid}", str(error))
                return GpuResult(durations=result.durations, up=False)
            except NvmlDownError:
                raise
            except Exception:
                result.faults.add(collector.name)
                log.exception("collector %s failed on GPU %d", collector.name, gpu.index)
            finally:
                result.durations[collector.name] = time.perf_counter() - began
        self._logged_faults.discard(f"lost:{gpu.uuid}")
        return result

    def _read_node(self) -> dict[str, tuple[list[Sample], float, bool]] | None:
        """Node-wide reads on their own worker with a deadline; None while it is wedged.

        A timeout is counted once, under the NVML function the worker is inside (or
        "unknown" when it is stuck outside NVML, e.g. in the kubelet call).
        """
        if self._node_worker is None:
            self._node_worker = Worker("nvml-node")
        worker = self._node_worker
        if worker.busy:
            return None  # still wedged: fail fast, counted when it started
        future = worker.submit(self._read_node_collectors)
        done, _ = wait_futures([future], timeout=self.nvml_timeout)
        if not done:
            function = self.nvml.in_flight.get(worker.thread.ident or 0, "unknown")
            self.nvml.count_error(function, ErrorKind.TIMEOUT)
            self._log_once(f"hang:node:{function}", f"node-wide read hung in {function}")
            return None
        self._forget_logged("hang:node:")
        node_results: dict[str, tuple[list[Sample], float, bool]] = future.result()
        return node_results

    def _read_node_collectors(self) -> dict[str, tuple[list[Sample], float, bool]]:
        out: dict[str, tuple[list[Sample], float, bool]] = {}
        for collector in self.collectors:
            began = time.perf_counter()
            try:
                samples = collector.read_node(self.nvml, self.gpus)
                ok = True
            except NvmlDownError:
                raise
            except Exception:
                log.exception("collector %s failed reading the node", collector.name)
                samples, ok = [], False
            out[collector.name] = (samples, time.perf_counter() - began, ok)
        return out

    def _finish_cycle(self, started: float) -> None:
        self._cycle_seconds = time.perf_counter() - started
        self.last_cycle_finished = self.clock()
        everything = [sample for collector in self.collectors for sample in collector.samples]
        body, dropped = render(everything + self._health.samples())
        self.samples_dropped += dropped
        with self._lock:
            self._exposition, self._exposition_gzip = body, None

    def _forget_logged(self, prefix: str) -> None:
        """The fault is over: log it again if it comes back."""
        if self._logged_faults:
            self._logged_faults = {k for k in self._logged_faults if not k.startswith(prefix)}

    def _log_once(self, key: str, message: str) -> None:
        if key not in self._logged_faults:
            self._logged_faults.add(key)
            log.warning(message)

    # -- serving -----------------------------------------------------------------------------
    def exposition(self, gzipped: bool = False) -> bytes:
        """The last cycle's /metrics body; gzip is computed once per cycle, on first demand."""
        with self._lock:
            if not gzipped:
                return self._exposition
            if self._exposition_gzip is None:
                self._exposition_gzip = gzip.compress(self._exposition, compresslevel=1)
            return self._exposition_gzip

    def healthy(self) -> bool:
        """True while cycles keep finishing; a stalled loop fails the liveness probe."""
        if self.last_cycle_finished is None:
            return False
        stale_after = 3 * self.interval + self.nvml_timeout + 5
        return self.clock() - self.last_cycle_finished < stale_after


def _reads_node(collector: Collector) -> bool:
    """Whether the collector has node-wide reads of its own (not the base class's no-op)."""
    return type(collector).read_node is not Collector.read_node


class _ExporterHealth:
    """Per-GPU up series and the exporter's own meta-metrics; always on."""

    def __init__(self, exporter: Exporter) -> None:
        self.exporter = exporter
        self.build_labels = (
            exporter.node,
            __version__,
            nvml_bindings_version(),
            platform.python_version(),
        )

    def collect(self) -> Iterator[Metric]:
        yield from build_families(self.samples())

    def samples(self) -> list[Sample]:
        exporter = self.exporter
        node = (exporter.node,)
        samples: list[Sample] = [(m.EXPORTER_BUILD_INFO, self.build_labels, 1.0)]
        samples.append((m.EXPORTER_NVML_UP, node, 1.0 if exporter.nvml.initialised else 0.0))
        for labels, up in exporter._gpu_up.items():
            samples.append((m.GPU_UP, labels, 1.0 if up else 0.0))
        for name, seconds in exporter._durations.items():
            samples.append((m.EXPORTER_COLLECTOR_DURATION, (*node, name), seconds))
        for name, ok in exporter._success.items():
            samples.append((m.EXPORTER_COLLECTOR_SUCCESS, (*node, name), 1.0 if ok else 0.0))
        for (function, kind), count in sorted(exporter.nvml.error_counts().items()):
            samples.append((m.EXPORTER_NVML_ERRORS, (*node, function, kind), float(count)))
        samples.append((m.EXPORTER_SAMPLES_DROPPED, node, float(exporter.samples_dropped)))
        attribution = exporter.attribution
        if attribution is not None:
            for source, up in sorted(attribution.up.items()):
                samples.append((m.EXPORTER_ATTRIBUTION_UP, (*node, source), 1.0 if up else 0.0))
            for source, count in sorted(attribution.errors.items()):
                errors = (m.EXPORTER_ATTRIBUTION_ERRORS, (*node, source), float(count))
                samples.append(errors)
        samples.append((m.EXPORTER_COLLECTION_DURATION, node, exporter._cycle_seconds))
        if exporter.last_cycle_finished is not None:
            samples.append((m.EXPORTER_LAST_COLLECTION, node, exporter.last_cycle_finished))
        return samples
