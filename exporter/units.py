"""NVML's units to Prometheus base units, in one place.

NVML reports percent, milli-units, MiB, MHz and KB/s; the catalogue promises ratios, base units,
bytes, hertz and bytes per second. Every conversion the exporter makes goes through here.
"""

MIB = 1024 * 1024
KIB = 1024


def percent_to_ratio(percent: float) -> float:
    """NVML utilization percent (0-100) to a 0-1 ratio."""
    return percent / 100.0


def milli_to_base(milli: float) -> float:
    """Milliwatts to watts, millijoules to joules."""
    return milli / 1000.0


def mib_to_bytes(mib: float) -> float:
    return mib * MIB


def kib_to_bytes(kib: float) -> float:
    """NVML's "KB" throughput figures are KiB (1024 bytes)."""
    return kib * KIB


def mhz_to_hertz(mhz: float) -> float:
    return mhz * 1_000_000.0
