"""Device ids as NVIDIA's device plugin reports them to the kubelet, parsed into their parts.

The kubelet only knows opaque strings; which GPU or MIG slice a pod holds is encoded in them by
the device plugin (with its default ``deviceIDStrategy: uuid``):

- ``GPU-<uuid>``: a whole GPU;
- ``GPU-<uuid>::<n>``: replica ``n`` of a time-sliced or MPS-shared GPU (several pods hold
  replicas of the same GPU);
- ``MIG-<uuid>``: a MIG device, named by the UUID NVML gives it (R470 drivers and later);
- ``MIG-GPU-<uuid>/<gi>/<ci>``: the legacy MIG form (drivers before R470): the parent GPU's
  UUID, the GPU instance id and the compute instance id;
- a MIG form followed by ``::<n>``: a time-sliced MIG device.

With ``deviceIDStrategy: index`` the plugin reports bare indices (``0``, ``0:1``), which say
nothing stable about the device; those are refused with a message naming the setting.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_HEX_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_REPLICA = r"(?:::(?P<replica>\d+))?"

_GPU_RE = re.compile(rf"(?P<gpu>GPU-{_HEX_UUID}){_REPLICA}")
_MIG_RE = re.compile(rf"(?P<mig>MIG-{_HEX_UUID}){_REPLICA}")
_LEGACY_MIG_RE = re.compile(rf"MIG-(?P<gpu>GPU-{_HEX_UUID})/(?P<gi>\d+)/(?P<ci>\d+){_REPLICA}")
_INDEX_RE = re.compile(r"\d+(?::\d+)?(?:::\d+)?")

# Device ids longer than this are not NVIDIA ids; refusing them early keeps error messages and
# any label built from them bounded.
_MAX_LEN = 128


@dataclass(frozen=True)
class DeviceRef:
    """One device id from the kubelet, split into the parts that identify the GPU or MIG slice.

    Exactly one of ``gpu_uuid`` (whole, time-sliced or legacy-MIG parent GPU) and ``mig_uuid``
    (current MIG form) is set; ``gpu_instance`` and ``compute_instance`` are set only for the
    legacy MIG form, ``replica`` only for shared (time-sliced or MPS) devices.
    """

    raw: str
    gpu_uuid: str | None
    mig_uuid: str | None
    gpu_instance: int | None
    compute_instance: int | None
    replica: int | None

    @property
    def is_mig(self) -> bool:
        """True for either MIG form (current ``MIG-<uuid>`` or legacy ``MIG-GPU-.../gi/ci``)."""
        return self.mig_uuid is not None or self.gpu_instance is not None


def _replica(m: re.Match[str]) -> int | None:
    r = m.group("replica")
    return int(r) if r is not None else None


def parse_device_id(device_id: str) -> DeviceRef:
    """Parse one device id of NVIDIA's device plugin; ValueError says why one is not.

    UUIDs are kept as NVML prints them (with their ``GPU-``/``MIG-`` prefix) so they join
    directly with the exporter's ``uuid`` and ``mig_uuid`` labels.
    """
    if not isinstance(device_id, str):
        raise ValueError(f"device id must be a string, got {type(device_id).__name__}")
    if len(device_id) > _MAX_LEN:
        raise ValueError(
            f"device id is {len(device_id)} characters long, more than any NVIDIA device id "
            f"({_MAX_LEN}): {device_id[:40]!r}..."
        )
    if m := _GPU_RE.fullmatch(device_id):
        return DeviceRef(device_id, m.group("gpu"), None, None, None, _replica(m))
    if m := _MIG_RE.fullmatch(device_id):
        return DeviceRef(device_id, None, m.group("mig"), None, None, _replica(m))
    if m := _LEGACY_MIG_RE.fullmatch(device_id):
        return DeviceRef(
            device_id,
            m.group("gpu"),
            None,
            int(m.group("gi")),
            int(m.group("ci")),
            _replica(m),
        )
    if _INDEX_RE.fullmatch(device_id):
        raise ValueError(
            f"device id {device_id!r} is an index, not a UUID: the NVIDIA device plugin runs "
            "with deviceIDStrategy=index; set it to uuid so devices can be attributed"
        )
    raise ValueError(
        f"device id {device_id!r} is not an NVIDIA device id: expected GPU-<uuid>, "
        "MIG-<uuid> or MIG-GPU-<uuid>/<gi>/<ci>, optionally followed by ::<replica>"
    )
