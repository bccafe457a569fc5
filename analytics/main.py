"""``gpu-analytics``: serve the analytics API, or run one of its tools.

``gpu-analytics --config FILE [--listen HOST:PORT]`` serves under waitress; ``gpu-analytics
rules --pricing FILE --out rules/pricing.yml`` writes the pricing recording rules (implemented
by :mod:`analytics.pricing`, imported only when that subcommand runs).

Why waitress and not gunicorn: waitress is a pure-Python, multi-threaded WSGI server that runs
in-process. It does not fork workers, so the app's Prometheus client, its metrics registry
(one ``/metrics`` for the whole pod, no multiprocess-mode directory) and its caches live in one
process; it needs no writable directories or control sockets and runs unchanged as a non-root
user in a read-only container; the request work is I/O-bound waiting on Prometheus, which
threads handle well. (Its Windows support, often cited, is irrelevant here.) Scale out with
replicas, not workers.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from analytics.config import ConfigError, load_config, parse_listen
from analytics.pricing import PricingError

log = logging.getLogger("gpu-analytics")

CONFIG_ENV = "GPU_ANALYTICS_CONFIG"
EXIT_CONFIG = 2
DEFAULT_THREADS = 8

# The CLI entry point analytics.pricing provides for `gpu-analytics rules`:
# ``rules_main(argv: Sequence[str]) -> int`` (``main`` is accepted too).
PRICING_MODULE = "analytics.pricing"
PRICING_ENTRY_POINTS = ("rules_main", "main")


def _listen(text: str) -> str:
    try:
        parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (e.g. 0.0.0.0:8080 or :8080)") from None
    return text


def build_parser() -> argparse.ArgumentParser:
    """The command line: serving options at the top level, tools as subcommands."""
    parser = argparse.ArgumentParser(
        prog="gpu-analytics",
        description="GPU cost and usage analytics over Prometheus: a JSON API under /api/v1. "
        "Without a subcommand it serves.",
    )
    parser.add_argument(
        "--config",
        default=os.environ.get(CONFIG_ENV),
        metavar="FILE",
        help=f"YAML configuration file (env {CONFIG_ENV}); GPU_ANALYTICS_* variables override it",
    )
    parser.add_argument(
        "--listen",
        type=_listen,
        default=None,
        metavar="HOST:PORT",
        help="address to serve on (overrides `listen` in the config; default 0.0.0.0:8080)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=DEFAULT_THREADS,
        help=f"waitress worker threads (default {DEFAULT_THREADS})",
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("GPU_ANALYTICS_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="log level (env GPU_ANALYTICS_LOG_LEVEL; default info)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    rules = commands.add_parser(
        "rules",
        help="write the pricing recording rules (gpu-analytics rules --help)",
        add_help=False,
        prefix_chars="\0",  # hand every argument, --help included, to analytics.pricing
    )
    rules.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _pricing_entry_point() -> Callable[[Sequence[str]], int]:
    try:
        module = importlib.import_module(PRICING_MODULE)
    except ImportError as exc:
        raise SystemExit(f"gpu-analytics rules: {PRICING_MODULE} is not available ({exc})") from exc
    for name in PRICING_ENTRY_POINTS:
        entry = getattr(module, name, None)
        if callable(entry):
            return entry
    raise SystemExit(
        f"gpu-analytics rules: {PRICING_MODULE} has no {' or '.join(PRICING_ENTRY_POINTS)}()"
    )


def serve(app: Any, host: str, port: int, threads: int) -> None:
    """Serve ``app`` under waitress until SIGTERM or SIGINT, then close the sockets."""
    import waitress

    server = waitress.create_server(
        app,
        host=host,
        port=port,
        threads=threads,
        ident="gpu-analytics",
        clear_untrusted_proxy_headers=True,
    )

    def stop(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    log.info("serving on http://%s:%d/api/v1 (threads=%d)", host, port, threads)
    try:
        server.run()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gpu-analytics`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "rules":
        return int(_pricing_entry_point()(list(args.args)))

    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = load_config(args.config)
        from analytics.app import create_app

        app = create_app(config)
    except (ConfigError, PricingError) as exc:
        # One line, naming file, key and fix; exit 2 like a usage error.
        print(f"gpu-analytics: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    host, port = parse_listen(args.listen) if args.listen else config.listen_address
    serve(app, host, port, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
