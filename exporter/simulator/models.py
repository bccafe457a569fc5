"""GPU models and MIG profile tables with the figures a real driver reports.

The numbers come from the public data sheets and from what `nvidia-smi mig -lgip` prints on
these boards; where NVIDIA does not publish a figure the value is a realistic stand-in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# nvmlDeviceArchitecture_t values (nvml.h).
ARCH_AMPERE = 7
ARCH_ADA = 8
ARCH_HOPPER = 9
# nvmlBrandType_t: data-centre boards report NVML_BRAND_NVIDIA (14) on current drivers.
BRAND_NVIDIA = 14

# MIG splits the GPU into 8 memory slices and 7 compute slices.
MIG_MEMORY_SLICES = 8
MIG_COMPUTE_SLICES = 7


@dataclass(frozen=True)
class MigProfile:
    """One GPU-instance profile as the driver describes it in nvmlGpuInstanceProfileInfo_v2_t.

    `index` is the NVML_GPU_INSTANCE_PROFILE_* enum a caller passes to
    nvmlDeviceGetGpuInstanceProfileInfo; `profile_id` is what the driver puts in the struct's
    `id` field (the "ID" column of `nvidia-smi mig -lgip`), and what nvmlDeviceGetGpuInstances,
    nvmlDeviceGetGpuInstanceRemainingCapacity and nvmlGpuInstanceGetInfo use.
    """

    key: str  # "1g.10gb"
    index: int  # NVML_GPU_INSTANCE_PROFILE_*
    profile_id: int  # info.id
    slice_count: int  # compute slices (info.sliceCount)
    memory_slices: int  # memory slices the placement occupies (placement.size)
    instance_count: int  # most instances of this profile on one GPU
    multiprocessor_count: int
    copy_engine_count: int
    decoder_count: int
    encoder_count: int
    jpeg_count: int
    ofa_count: int
    memory_size_mb: int
    placements: tuple[int, ...]  # allowed placement starts, in memory slices

    @property
    def name(self) -> str:
        """The profile name the driver writes into the struct's `name` field."""
        return f"MIG {self.key}"

    @property
    def compute_profile_index(self) -> int:
        """The NVML_COMPUTE_INSTANCE_PROFILE_* of the one compute instance spanning the GI."""
        return {1: 0, 2: 1, 3: 2, 4: 3, 6: 6, 7: 4, 8: 5}[self.slice_count]


def gpu_instance_id(memory_slices: int, start: int) -> int:
    """The GPU instance id a driver gives to a placement.

    GI ids are nodes of the slice tree: 0 is the whole GPU, 1-2 the halves, 3-6 the quarters
    and 7-13 the single slices, which is why 7x1g.10gb shows up as GI 7..13 in nvidia-smi.
    """
    if memory_slices >= 8:
        return 0
    if memory_slices >= 4:
        return 1 + start // 4
    if memory_slices >= 2:
        return 3 + start // 2
    return 7 + start


def _profiles(
    mem: dict[str, int], sms: dict[str, int], dec: dict[str, int], media: dict[str, int]
) -> tuple[MigProfile, ...]:
    # (key, enum index, id, compute slices, memory slices, instances, CEs, placements)
    shape = [
        ("1g.10gb", 0, 19, 1, 1, 7, 1, (0, 1, 2, 3, 4, 5, 6)),
        ("1g.20gb", 9, 15, 1, 2, 4, 1, (0, 2, 4, 6)),
        ("2g.20gb", 1, 14, 2, 2, 3, 2, (0, 2, 4)),
        ("3g.40gb", 2, 9, 3, 4, 2, 3, (0, 4)),
        ("4g.40gb", 3, 5, 4, 4, 1, 4, (0,)),
        ("7g.80gb", 4, 0, 7, 8, 1, 7, (0,)),
    ]
    return tuple(
        MigProfile(
            key=key,
            index=index,
            profile_id=pid,
            slice_count=cs,
            memory_slices=ms,
            instance_count=count,
            multiprocessor_count=sms[key],
            copy_engine_count=ce,
            decoder_count=dec[key],
            encoder_count=0,
            jpeg_count=media[key],
            ofa_count=media[key],
            memory_size_mb=mem[key],
            placements=placements,
        )
        for key, index, pid, cs, ms, count, ce, placements in shape
    )


A100_80GB_PROFILES = _profiles(
    mem={
        "1g.10gb": 9728,
        "1g.20gb": 19968,
        "2g.20gb": 19968,
        "3g.40gb": 40192,
        "4g.40gb": 40192,
        "7g.80gb": 81152,
    },
    sms={"1g.10gb": 14, "1g.20gb": 14, "2g.20gb": 28, "3g.40gb": 42, "4g.40gb": 56, "7g.80gb": 98},
    dec={"1g.10gb": 0, "1g.20gb": 1, "2g.20gb": 1, "3g.40gb": 2, "4g.40gb": 2, "7g.80gb": 5},
    media={"1g.10gb": 0, "1g.20gb": 0, "2g.20gb": 0, "3g.40gb": 0, "4g.40gb": 0, "7g.80gb": 1},
)

H100_80GB_PROFILES = _profiles(
    mem={
        "1g.10gb": 9984,
        "1g.20gb": 20096,
        "2g.20gb": 20096,
        "3g.40gb": 40448,
        "4g.40gb": 40448,
        "7g.80gb": 81152,
    },
    sms={"1g.10gb": 16, "1g.20gb": 26, "2g.20gb": 32, "3g.40gb": 60, "4g.40gb": 64, "7g.80gb": 132},
    dec={"1g.10gb": 1, "1g.20gb": 1, "2g.20gb": 1, "3g.40gb": 2, "4g.40gb": 3, "7g.80gb": 7},
    media={"1g.10gb": 1, "1g.20gb": 1, "2g.20gb": 1, "3g.40gb": 2, "4g.40gb": 3, "7g.80gb": 7},
)


@dataclass(frozen=True)
class GpuModel:
    """The fixed figures of one board: what never changes while the driver is loaded."""

    key: str
    name: str
    memory_mib: int
    reserved_mib: int  # what nvmlMemory_v2_t reports as `reserved` (driver/firmware carve-out)
    power_limit_w: int
    idle_power_w: float
    peak_power_w: float  # what a saturating job draws; the limit caps bursts above it
    architecture: int
    brand: int
    sm_count: int
    max_sm_mhz: int
    idle_sm_mhz: int
    max_mem_mhz: int
    idle_mem_mhz: int
    max_video_mhz: int
    idle_video_mhz: int
    idle_temp_c: float
    load_temp_c: float
    nvlink_links: int
    nvlink_link_kib_per_s: int  # one direction, one link, at full use
    gpm: bool
    has_fan: bool
    media_engines: bool  # NVENC/NVDEC present and used by video inference
    pci_device_id: int
    pci_subsystem_id: int
    pci_buses: tuple[int, ...]  # bus numbers of GPU 0..n on a typical server
    serial_prefix: str
    mig_profiles: tuple[MigProfile, ...] = ()

    @property
    def mig_capable(self) -> bool:
        return bool(self.mig_profiles)

    def profile(self, key: str) -> MigProfile | None:
        """The MIG profile named like `1g.10gb`, or None when the board has no such profile."""
        for p in self.mig_profiles:
            if p.key == key:
                return p
        return None

    def profile_by_index(self, index: int) -> MigProfile | None:
        for p in self.mig_profiles:
            if p.index == index:
                return p
        return None

    def profile_by_id(self, profile_id: int) -> MigProfile | None:
        for p in self.mig_profiles:
            if p.profile_id == profile_id:
                return p
        return None


# HGX boards hang their eight GPUs off these PCI buses on common Intel/AMD servers.
_HGX_BUSES = (0x18, 0x2A, 0x3A, 0x5D, 0x9A, 0xAB, 0xBA, 0xDB)

MODELS: dict[str, GpuModel] = {
    m.key: m
    for m in (
        GpuModel(
            key="A100-SXM4-80GB",
            name="NVIDIA A100-SXM4-80GB",
            memory_mib=81920,
            reserved_mib=512,
            power_limit_w=400,
            idle_power_w=62.0,
            peak_power_w=385.0,
            architecture=ARCH_AMPERE,
            brand=BRAND_NVIDIA,
            sm_count=108,
            max_sm_mhz=1410,
            idle_sm_mhz=210,
            max_mem_mhz=1593,
            idle_mem_mhz=1593,  # HBM2e stays at full clock
            max_video_mhz=1290,
            idle_video_mhz=585,
            idle_temp_c=32.0,
            load_temp_c=68.0,
            nvlink_links=12,
            nvlink_link_kib_per_s=24_414_062,  # 25 GB/s per direction per NVLink3 link
            gpm=False,  # GPM arrived with Hopper
            has_fan=False,
            media_engines=False,
            pci_device_id=0x20B210DE,
            pci_subsystem_id=0x147F10DE,
            pci_buses=_HGX_BUSES,
            serial_prefix="1322",
            mig_profiles=A100_80GB_PROFILES,
        ),
        GpuModel(
            key="H100-80GB-HBM3",
            name="NVIDIA H100 80GB HBM3",
            memory_mib=81559,
            reserved_mib=580,
            power_limit_w=700,
            idle_power_w=72.0,
            peak_power_w=660.0,
            architecture=ARCH_HOPPER,
            brand=BRAND_NVIDIA,
            sm_count=132,
            max_sm_mhz=1980,
            idle_sm_mhz=345,
            max_mem_mhz=2619,
            idle_mem_mhz=2619,
            max_video_mhz=1755,
            idle_video_mhz=765,
            idle_temp_c=33.0,
            load_temp_c=71.0,
            nvlink_links=18,
            nvlink_link_kib_per_s=24_414_062,  # 25 GB/s per direction per NVLink4 link
            gpm=True,
            has_fan=False,
            media_engines=False,
            pci_device_id=0x233010DE,
            pci_subsystem_id=0x16C110DE,
            pci_buses=_HGX_BUSES,
            serial_prefix="1654",
            mig_profiles=H100_80GB_PROFILES,
        ),
        GpuModel(
            key="L4",
            name="NVIDIA L4",
            memory_mib=23034,
            reserved_mib=330,
            power_limit_w=72,
            idle_power_w=16.0,
            peak_power_w=70.0,
            architecture=ARCH_ADA,
            brand=BRAND_NVIDIA,
            sm_count=58,
            max_sm_mhz=2040,
            idle_sm_mhz=210,
            max_mem_mhz=6251,
            idle_mem_mhz=405,  # GDDR6 drops to its idle clock
            max_video_mhz=1770,
            idle_video_mhz=795,
            idle_temp_c=34.0,
            load_temp_c=74.0,
            nvlink_links=0,
            nvlink_link_kib_per_s=0,
            gpm=True,
            has_fan=False,  # passively cooled: nvmlDeviceGetFanSpeed answers NOT_SUPPORTED
            media_engines=True,
            pci_device_id=0x27B810DE,
            pci_subsystem_id=0x16CA10DE,
            pci_buses=(0x01, 0x41, 0x81, 0xC1, 0x21, 0x61, 0xA1, 0xE1),
            serial_prefix="1325",
        ),
    )
}


@dataclass(frozen=True)
class Placement:
    """Where one GPU instance sits: its profile, first memory slice and the ids it gets."""

    profile: MigProfile
    start: int
    gpu_instance_id: int
    compute_instance_id: int = 0  # one CI spanning the whole GI, as `-cgi ... -C` creates


def place(model: GpuModel, keys: Sequence[str]) -> list[Placement] | None:
    """Lay out the requested profiles like a driver would, or None when they do not fit.

    Larger instances are placed first, each at the lowest free start its profile allows,
    backtracking when a choice blocks a later instance; compute slices may not exceed 7.
    """
    profiles = []
    for key in keys:
        p = model.profile(key)
        if p is None:
            raise KeyError(key)
        profiles.append(p)
    if sum(p.slice_count for p in profiles) > MIG_COMPUTE_SLICES:
        return None
    order = sorted(range(len(profiles)), key=lambda i: -profiles[i].memory_slices)
    used = [False] * MIG_MEMORY_SLICES
    chosen: dict[int, int] = {}

    def solve(k: int) -> bool:
        if k == len(order):
            return True
        i = order[k]
        p = profiles[i]
        for start in p.placements:
            span = range(start, start + p.memory_slices)
            if any(used[s] for s in span):
                continue
            for s in span:
                used[s] = True
            chosen[i] = start
            if solve(k + 1):
                return True
            for s in span:
                used[s] = False
        return False

    if not solve(0):
        return None
    out = [
        Placement(p, chosen[i], gpu_instance_id(p.memory_slices, chosen[i]))
        for i, p in enumerate(profiles)
    ]
    return sorted(out, key=lambda pl: pl.gpu_instance_id)


def remaining_capacity(profile: MigProfile, placements: Sequence[Placement]) -> int:
    """How many more instances of `profile` fit next to the existing ones.

    Placements of one profile never overlap each other, so the count of free placements is
    the number the driver could still create, capped by the free compute slices.
    """
    used = [False] * MIG_MEMORY_SLICES
    for pl in placements:
        for s in range(pl.start, pl.start + pl.profile.memory_slices):
            used[s] = True
    free_compute = MIG_COMPUTE_SLICES - sum(pl.profile.slice_count for pl in placements)
    free = sum(
        1
        for start in profile.placements
        if not any(used[s] for s in range(start, start + profile.memory_slices))
    )
    return max(0, min(free, free_compute // profile.slice_count))
