"""k8s-gpu-monitor's Prometheus exporter: per-GPU and per-MIG-instance metrics from NVML."""

__version__ = "0.1.0"
