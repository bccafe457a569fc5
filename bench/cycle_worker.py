"""Runs collection cycles back to back in its own process and reports CPU time and RSS as JSON.

`python -m bench.cycle_worker --side ours|baseline --fleet NAME --cycles N`. A separate process
per side, so RSS and CPU belong to one exporter alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import psutil

from bench.common import FLEETS, node_services, open_simulated_node, simulated_exporter


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--side", choices=("ours", "baseline"), required=True)
    parser.add_argument("--fleet", choices=sorted(FLEETS), required=True)
    parser.add_argument("--cycles", type=int, default=10_000)
    args = parser.parse_args()
    path, node = FLEETS[args.fleet]
    with node_services(path, node) as attribution:
        if args.side == "ours":
            cycle = simulated_exporter(path, node, attribution).run_cycle
        else:
            from bench.baseline_exporter import read_and_set

            nvml, gpus, collectors = open_simulated_node(path, node, attribution)

            def cycle() -> None:
                read_and_set(nvml, gpus, collectors)

        process = psutil.Process()
        cpu_seconds: list[float] = []
        rss: dict[int, int] = {}
        checkpoints = {1, args.cycles // 2, args.cycles}
        for number in range(1, args.cycles + 1):
            began = time.process_time()
            cycle()
            cpu_seconds.append(time.process_time() - began)
            if number in checkpoints:
                rss[number] = process.memory_info().rss
    print(
        json.dumps(
            {
                "side": args.side,
                "fleet": args.fleet,
                "cycles": args.cycles,
                "cycle_cpu_ms_median": statistics.median(cpu_seconds) * 1000,
                "cycle_cpu_ms_p90": statistics.quantiles(cpu_seconds, n=10)[-1] * 1000,
                "rss_mib": {str(k): v / 2**20 for k, v in sorted(rss.items())},
            }
        )
    )


if __name__ == "__main__":
    main()
