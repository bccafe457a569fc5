"""`gpu-exporter`: flags (with environment fallbacks), start-up, serving and clean shutdown."""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from exporter.attribution import MAX_POD_LABELS, Attribution
from exporter.collection import Exporter
from exporter.collectors import (
    OPTIONAL_COLLECTORS,
    AllocationCollector,
    Collector,
    DeviceCollector,
    EccCollector,
    MigCollector,
    NvLinkCollector,
    ProcessCollector,
    XidCollector,
)
from exporter.nvml import Nvml, NvmlStartupError
from exporter.podresources import DEFAULT_RESOURCES, DEFAULT_SOCKET, PodResourcesClient
from exporter.pods import PodInformer, api_client_for_url, api_client_from_environment
from exporter.procfs import ProcfsReader
from exporter.server import DEFAULT_MAX_REQUESTS, MetricsServer
from exporter.webconfig import WebConfigError, WebConfigWatcher

log = logging.getLogger("gpu-exporter")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$")


def parse_duration(text: str) -> float:
    """'5s', '500ms', '1m' or plain seconds, as seconds (argparse type)."""
    match = _DURATION.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 5s, 500ms or 1m")
    value = float(match.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[match.group(2)]
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than zero")
    return value


def parse_listen_address(text: str) -> tuple[str, int]:
    """'HOST:PORT' or ':PORT' (all interfaces) as (host, port) (argparse type)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT or :PORT (e.g. :9400)")
    return host.strip("[]") or "0.0.0.0", int(port)


def parse_max_requests(text: str) -> int:
    """A non-negative request cap (argparse type)."""
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return int(text)


def parse_collectors(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in OPTIONAL_COLLECTORS]
    if unknown:
        choices = ", ".join(OPTIONAL_COLLECTORS)
        raise argparse.ArgumentTypeError(
            f"unknown collector(s) {', '.join(unknown)}; choose from {choices}"
        )
    return names


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="gpu-exporter",
        description="Prometheus exporter for NVIDIA GPUs and MIG instances (NVML). "
        "Every flag falls back to the environment variable named in its help.",
    )
    parser.add_argument(
        "--web.listen-address",
        dest="listen",
        type=parse_listen_address,
        default=env("GPU_EXPORTER_LISTEN_ADDRESS", ":9400"),
        help="address to serve /metrics and /healthz on (env GPU_EXPORTER_LISTEN_ADDRESS; "
        "default :9400)",
    )
    parser.add_argument(
        "--web.config.file",
        dest="web_config",
        metavar="FILE",
        default=env("GPU_EXPORTER_WEB_CONFIG_FILE") or None,
        help="web configuration in the Prometheus exporter-toolkit format: TLS (1.2 or newer), "
        "mutual TLS, basic auth with bcrypt hashes; re-read when it changes "
        "(env GPU_EXPORTER_WEB_CONFIG_FILE; default: plain HTTP, no auth)",
    )
    parser.add_argument(
        "--web.max-requests",
        dest="max_requests",
        type=parse_max_requests,
        default=env("GPU_EXPORTER_WEB_MAX_REQUESTS", str(DEFAULT_MAX_REQUESTS)),
        help="most requests served at once; more are answered 503 at once, 0 for no limit "
        f"(env GPU_EXPORTER_WEB_MAX_REQUESTS; default {DEFAULT_MAX_REQUESTS})",
    )
    parser.add_argument(
        "--collection-interval",
        type=parse_duration,
        default=env("GPU_EXPORTER_COLLECTION_INTERVAL", "5s"),
        help="how often NVML is read; scrapes serve the latest reading "
        "(env GPU_EXPORTER_COLLECTION_INTERVAL; default 5s)",
    )
    parser.add_argument(
        "--nvml-timeout",
        type=parse_duration,
        default=env("GPU_EXPORTER_NVML_TIMEOUT", "1s"),
        help="how long one GPU's reads may take before the GPU is reported not up "
        "(env GPU_EXPORTER_NVML_TIMEOUT; default 1s)",
    )
    parser.add_argument(
        "--collectors",
        type=parse_collectors,
        default=env("GPU_EXPORTER_COLLECTORS", ",".join(OPTIONAL_COLLECTORS)),
        help="comma-separated collectors to run: "
        f"{', '.join(OPTIONAL_COLLECTORS)} (env GPU_EXPORTER_COLLECTORS; default all)",
    )
    parser.add_argument(
        "--node",
        default=env("NODE_NAME") or env("GPU_EXPORTER_NODE"),
        help="node name for the `node` label (env NODE_NAME; default the host name, or the "
        "only node of a --simulate fleet)",
    )
    parser.add_argument(
        "--simulate",
        metavar="FLEET.yaml",
        default=env("GPU_EXPORTER_SIMULATE"),
        help="serve a simulated node of this fleet file instead of the local GPUs "
        "(env GPU_EXPORTER_SIMULATE)",
    )
    parser.add_argument(
        "--simulate-time",
        type=float,
        metavar="UNIX_SECONDS",
        help="freeze the simulated clock at this instant (reproducible values for tests)",
    )
    parser.add_argument(
        "--kubelet-socket",
        default=env("GPU_EXPORTER_KUBELET_SOCKET", DEFAULT_SOCKET),
        help="kubelet pod-resources socket, for which pod holds which device "
        f"(env GPU_EXPORTER_KUBELET_SOCKET; default {DEFAULT_SOCKET})",
    )
    parser.add_argument(
        "--kubeconfig",
        default=env("KUBECONFIG"),
        help="kubeconfig for the pod informer when not running in a cluster (env KUBECONFIG)",
    )
    parser.add_argument(
        "--apiserver-url",
        default=env("GPU_EXPORTER_APISERVER_URL"),
        help="a Kubernetes API URL that needs no credentials (kubectl proxy, the simulator) "
        "instead of in-cluster config or --kubeconfig (env GPU_EXPORTER_APISERVER_URL)",
    )
    parser.add_argument(
        "--procfs",
        default=env("GPU_EXPORTER_PROCFS", "/proc"),
        help="the host's /proc, to map GPU processes to pods; needs hostPID "
        "(env GPU_EXPORTER_PROCFS; default /proc)",
    )
    parser.add_argument(
        "--pod-labels",
        type=parse_pod_labels,
        default=env("GPU_EXPORTER_POD_LABELS", ""),
        help="comma-separated pod labels to publish as label_<name> on process and allocation "
        f"series, at most {MAX_POD_LABELS} (env GPU_EXPORTER_POD_LABELS; e.g. team,app)",
    )
    parser.add_argument(
        "--gpu-resources",
        type=parse_list,
        default=env("GPU_EXPORTER_GPU_RESOURCES", ""),
        help="extra extended-resource names or globs that are GPUs, beside "
        f"{', '.join(DEFAULT_RESOURCES)} (env GPU_EXPORTER_GPU_RESOURCES)",
    )
    parser.add_argument(
        "--process-series-limit",
        type=int,
        default=int(env("GPU_EXPORTER_PROCESS_SERIES_LIMIT", "64")),
        help="most processes published per GPU; the rest are counted as dropped "
        "(env GPU_EXPORTER_PROCESS_SERIES_LIMIT; default 64)",
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default=env("GPU_EXPORTER_LOG_LEVEL", "info"),
        help="(env GPU_EXPORTER_LOG_LEVEL; default info)",
    )
    return parser


def parse_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def parse_pod_labels(text: str) -> tuple[str, ...]:
    labels = parse_list(text)
    if len(labels) > MAX_POD_LABELS:
        raise argparse.ArgumentTypeError(
            f"{len(labels)} pod labels given; at most {MAX_POD_LABELS} may become metric labels"
        )
    return labels


def build_collectors(
    names: Sequence[str],
    clock: Callable[[], float],
    attribution: Attribution | None = None,
    process_series_limit: int = 64,
) -> list[Collector]:
    """The collectors named, in a fixed order (MIG before processes, which use its instances)."""
    attribution = attribution or Attribution(pod_resources=None, informer=None, procfs=None)
    factories: dict[str, Callable[[], Collector]] = {
        "device": DeviceCollector,
        "ecc": EccCollector,
        "nvlink": NvLinkCollector,
        "mig": MigCollector,
        "xid": lambda: XidCollector(clock),
        "process": lambda: ProcessCollector(attribution, process_series_limit),
        "allocation": lambda: AllocationCollector(attribution),
    }
    return [factories[name]() for name in OPTIONAL_COLLECTORS if name in names]


def build_attribution(
    args: argparse.Namespace, node: str
) -> tuple[Attribution, PodInformer | None]:
    """Kubelet, API server and /proc sources for the collectors that need them."""
    wants_devices = "allocation" in args.collectors
    wants_processes = "process" in args.collectors
    if not wants_devices and not wants_processes:
        return Attribution(pod_resources=None, informer=None, procfs=None), None
    api_client = (
        api_client_for_url(args.apiserver_url)
        if args.apiserver_url
        else api_client_from_environment(args.kubeconfig)
    )
    informer = PodInformer(api_client, node) if api_client is not None else None
    on_kubernetes = informer is not None or os.path.exists(args.kubelet_socket)
    pod_resources = None
    if wants_devices and on_kubernetes:
        resources = (*DEFAULT_RESOURCES, *args.gpu_resources)
        pod_resources = PodResourcesClient(args.kubelet_socket, resources=resources)
    procfs = ProcfsReader(args.procfs) if wants_processes else None
    attribution = Attribution(
        pod_resources=pod_resources, informer=informer, procfs=procfs, pod_labels=args.pod_labels
    )
    return attribution, informer


def _install_simulator(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[Callable[[], float], Any]:
    """Put the simulated driver below pynvml for this node and start its kubelet, API server
    and /proc; returns the simulated clock and those services (stopped at exit)."""
    from exporter.simulator import FleetError, ManualClock, WallClock, install, load_fleet
    from exporter.simulator.node import SimulatedNodeServices

    try:
        fleet = load_fleet(args.simulate)
    except (FleetError, OSError) as error:
        parser.exit(2, f"gpu-exporter: error: {error}\n")
    if args.node is None:
        if len(fleet.nodes) != 1:
            names = ", ".join(fleet.nodes)
            parser.exit(
                2, f"gpu-exporter: error: --node is required; {args.simulate} has {names}\n"
            )
        args.node = next(iter(fleet.nodes))
    if args.node not in fleet.nodes:
        names = ", ".join(fleet.nodes)
        parser.exit(
            2, f"gpu-exporter: error: node {args.node!r} is not in {args.simulate} ({names})\n"
        )
    clock = WallClock() if args.simulate_time is None else ManualClock(args.simulate_time)
    driver = install(fleet, args.node, clock=clock)
    services = SimulatedNodeServices(driver)
    services.start()
    # The node's own kubelet socket, API server and /proc, unless flags point elsewhere.
    if args.kubelet_socket == DEFAULT_SOCKET:
        args.kubelet_socket = str(services.kubelet_socket)
    if args.procfs == "/proc":
        args.procfs = str(services.procfs_root)
    if args.kubeconfig is None and args.apiserver_url is None:
        args.apiserver_url = services.apiserver_url
    return clock.now, services


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    web = None
    if args.web_config:
        try:
            web = WebConfigWatcher(args.web_config)
        except WebConfigError as error:
            print(f"gpu-exporter: error: web config {error}", file=sys.stderr)
            return 1
    clock: Callable[[], float] = time.time
    services = None
    if args.simulate:
        clock, services = _install_simulator(parser, args)
    node = args.node or socket.gethostname()
    nvml = Nvml(node)
    try:
        nvml.init()
    except NvmlStartupError as error:
        print(f"gpu-exporter: error: {error}", file=sys.stderr)
        if services is not None:
            services.stop()
        return 1
    attribution, informer = build_attribution(args, node)
    if {"process", "allocation"} & set(args.collectors):
        attribution.announce()
    exporter = Exporter(
        nvml,
        build_collectors(args.collectors, clock, attribution, args.process_series_limit),
        interval=args.collection_interval,
        nvml_timeout=args.nvml_timeout,
        clock=clock,
        attribution=attribution,
    )

    def stop_services() -> None:
        if informer is not None:
            informer.stop()
        if attribution.pod_resources is not None:
            attribution.pod_resources.close()
        if services is not None:
            services.stop()

    exporter.start_nvml()
    if informer is not None:
        informer.start()
        informer.wait_synced(timeout=5.0)
    exporter.run_cycle()
    try:
        server = MetricsServer(args.listen, exporter, web=web, max_requests=args.max_requests)
    except OSError as error:
        host, port = args.listen
        print(f"gpu-exporter: error: cannot listen on {host}:{port}: {error}", file=sys.stderr)
        exporter.close()
        stop_services()
        return 1
    server.serve_in_background()
    log.info("serving /metrics on %s://%s:%d for node %s", server.scheme, *args.listen, node)

    def stop(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: shutting down", signum)
        exporter.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    exporter.run_forever()
    server.shutdown()
    server.server_close()
    exporter.close()
    stop_services()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
