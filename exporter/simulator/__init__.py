"""A simulated NVIDIA driver below pynvml, for tests, benchmarks and the demo.

Load a fleet file, install one node's driver, and every pynvml call runs against it:

    fleet = load_fleet("examples/fleet.yaml")
    driver = install(fleet, "gpu-node-h100", ManualClock(1_700_000_000))
    pynvml.nvmlInit()
    ...
    uninstall()
"""

from .clock import Clock, ManualClock, WallClock
from .driver import FUNCTION_NAMES, SimulatedDriver, install, uninstall
from .fleet import (
    Fault,
    Fleet,
    FleetError,
    GpuState,
    MigState,
    SimGpu,
    SimMigInstance,
    SimNode,
    Workload,
    load_fleet,
    parse_fleet,
)
from .models import MODELS, GpuModel, MigProfile

__all__ = [
    "FUNCTION_NAMES",
    "MODELS",
    "Clock",
    "Fault",
    "Fleet",
    "FleetError",
    "GpuModel",
    "GpuState",
    "ManualClock",
    "MigProfile",
    "MigState",
    "SimGpu",
    "SimMigInstance",
    "SimNode",
    "SimulatedDriver",
    "WallClock",
    "Workload",
    "install",
    "load_fleet",
    "parse_fleet",
    "uninstall",
]
