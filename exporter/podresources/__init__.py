"""Which pod holds which GPU: the kubelet's pod-resources v1 API.

``api_pb2`` and ``api_pb2_grpc`` are generated from ``api.proto`` (the kubelet's own proto) by
``scripts/gen-podresources.sh``; do not edit them. Everything else codes against this module:

    client = PodResourcesClient()             # /var/lib/kubelet/pod-resources/kubelet.sock
    for a in client.list_assignments():       # raises PodResourcesUnavailable if it cannot
        print(a.namespace, a.pod, a.container, a.device.gpu_uuid or a.device.mig_uuid)
"""

from exporter.podresources.client import (
    DEFAULT_RESOURCES,
    DEFAULT_SOCKET,
    DeviceAssignment,
    PodResourcesClient,
    PodResourcesUnavailable,
)
from exporter.podresources.devices import DeviceRef, parse_device_id

__all__ = [
    "DEFAULT_RESOURCES",
    "DEFAULT_SOCKET",
    "DeviceAssignment",
    "DeviceRef",
    "PodResourcesClient",
    "PodResourcesUnavailable",
    "parse_device_id",
]
