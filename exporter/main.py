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

from exporter.collection import Exporter
from exporter.collectors import (
    OPTIONAL_COLLECTORS,
    Collector,
    DeviceCollector,
    EccCollector,
    MigCollector,
    NvLinkCollector,
    XidCollector,
)
from exporter.nvml import Nvml, NvmlStartupError
from exporter.server import MetricsServer

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
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default=env("GPU_EXPORTER_LOG_LEVEL", "info"),
        help="(env GPU_EXPORTER_LOG_LEVEL; default info)",
    )
    return parser


def build_collectors(names: Sequence[str], clock: Callable[[], float]) -> list[Collector]:
    factories: dict[str, Callable[[], Collector]] = {
        "device": DeviceCollector,
        "ecc": EccCollector,
        "nvlink": NvLinkCollector,
        "mig": MigCollector,
        "xid": lambda: XidCollector(clock),
    }
    return [factories[name]() for name in OPTIONAL_COLLECTORS if name in names]


def _install_simulator(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> Callable[[], float]:
    """Put the simulated driver below pynvml for this node; returns the simulated clock."""
    from exporter.simulator import FleetError, ManualClock, WallClock, install, load_fleet

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
    install(fleet, args.node, clock=clock)
    return clock.now


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    clock: Callable[[], float] = time.time
    if args.simulate:
        clock = _install_simulator(parser, args)
    node = args.node or socket.gethostname()

    exporter = Exporter(
        Nvml(node),
        build_collectors(args.collectors, clock),
        interval=args.collection_interval,
        nvml_timeout=args.nvml_timeout,
        clock=clock,
    )
    try:
        exporter.start_nvml()
    except NvmlStartupError as error:
        print(f"gpu-exporter: error: {error}", file=sys.stderr)
        return 1
    exporter.run_cycle()
    try:
        server = MetricsServer(args.listen, exporter)
    except OSError as error:
        host, port = args.listen
        print(f"gpu-exporter: error: cannot listen on {host}:{port}: {error}", file=sys.stderr)
        exporter.close()
        return 1
    server.serve_in_background()
    log.info("serving /metrics on %s:%d for node %s", *args.listen, node)

    def stop(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: shutting down", signum)
        exporter.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    exporter.run_forever()
    server.shutdown()
    server.server_close()
    exporter.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
