"""The simulated driver, exercised through pynvml's own wrappers as an exporter would."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pynvml
import pytest

from exporter.simulator import (
    FleetError,
    ManualClock,
    SimulatedDriver,
    install,
    load_fleet,
    parse_fleet,
    uninstall,
)

ROOT = Path(__file__).resolve().parents[2]
SMALL = ROOT / "tests" / "fleets" / "small.yaml"
T0 = 1_717_243_200.0  # 2024-06-01 12:00 UTC


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def driver(clock: ManualClock) -> Iterator[SimulatedDriver]:
    drv = install(load_fleet(SMALL), "mixed", clock)
    pynvml.nvmlInit()
    try:
        yield drv
    finally:
        drv.release_hangs()
        uninstall()


def mig_handles(gpu: object) -> list[object]:
    out = []
    for i in range(pynvml.nvmlDeviceGetMaxMigDeviceCount(gpu)):
        try:
            out.append(pynvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu, i))
        except pynvml.NVMLError_NotFound:
            continue
    return out


def test_system_queries_answer_the_node_driver(driver: SimulatedDriver) -> None:
    assert pynvml.nvmlSystemGetDriverVersion() == "570.124.06"
    assert pynvml.nvmlSystemGetCudaDriverVersion() == 12080
    assert pynvml.nvmlSystemGetNVMLVersion() == "12.570.124.06"
    assert pynvml.nvmlDeviceGetCount() == 4


def test_calls_before_init_are_uninitialized(clock: ManualClock) -> None:
    install(load_fleet(SMALL), "mixed", clock)
    try:
        with pytest.raises(pynvml.NVMLError_Uninitialized):
            pynvml.nvmlDeviceGetCount()
        pynvml.nvmlInit()
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        assert pynvml.nvmlDeviceGetCount() == 4  # init is reference counted
        pynvml.nvmlShutdown()
        with pytest.raises(pynvml.NVMLError_Uninitialized):
            pynvml.nvmlDeviceGetCount()
    finally:
        uninstall()


def test_identity_of_a_whole_gpu(driver: SimulatedDriver) -> None:
    h = pynvml.nvmlDeviceGetHandleByIndex(2)
    assert pynvml.nvmlDeviceGetName(h) == "NVIDIA A100-SXM4-80GB"
    assert pynvml.nvmlDeviceGetUUID(h).startswith("GPU-")
    assert pynvml.nvmlDeviceGetPciInfo(h).busId == "00000000:3A:00.0"
    assert pynvml.nvmlDeviceGetIndex(h) == 2
    assert pynvml.nvmlDeviceGetArchitecture(h) == pynvml.NVML_DEVICE_ARCH_AMPERE
    assert pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM) == 1410
    assert pynvml.nvmlDeviceGetEnforcedPowerLimit(h) == 400_000
    assert pynvml.nvmlDeviceGetMigMode(h) == [0, 0]
    assert mig_handles(h) == []


def test_mig_handles_enumerate_with_real_profiles_and_ids(driver: SimulatedDriver) -> None:
    gpu = pynvml.nvmlDeviceGetHandleByIndex(0)
    assert pynvml.nvmlDeviceGetMigMode(gpu) == [1, 1]
    migs = mig_handles(gpu)
    seen = []
    for m in migs:
        assert pynvml.nvmlDeviceIsMigDeviceHandle(m)
        assert pynvml.nvmlDeviceGetUUID(m).startswith("MIG-")
        parent = pynvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(m)
        assert pynvml.nvmlDeviceGetUUID(parent) == pynvml.nvmlDeviceGetUUID(gpu)
        attrs = pynvml.nvmlDeviceGetAttributes(m)
        seen.append(
            (
                pynvml.nvmlDeviceGetName(m),
                pynvml.nvmlDeviceGetGpuInstanceId(m),
                pynvml.nvmlDeviceGetComputeInstanceId(m),
                attrs.gpuInstanceSliceCount,
                attrs.memorySizeMB,
            )
        )
    assert seen == [
        ("NVIDIA H100 80GB HBM3 MIG 4g.40gb", 1, 0, 4, 40448),
        ("NVIDIA H100 80GB HBM3 MIG 2g.20gb", 5, 0, 2, 20096),
        ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", 13, 0, 1, 9984),
    ]


def test_seven_1g_instances_get_gpu_instance_ids_7_to_13(driver: SimulatedDriver) -> None:
    gpu = pynvml.nvmlDeviceGetHandleByIndex(1)
    ids = [pynvml.nvmlDeviceGetGpuInstanceId(m) for m in mig_handles(gpu)]
    assert ids == list(range(7, 14))
    info = pynvml.nvmlDeviceGetGpuInstanceProfileInfo(gpu, pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE)
    assert (info.id, info.name, info.instanceCount, info.sliceCount) == (19, "MIG 1g.10gb", 7, 1)
    assert pynvml.nvmlDeviceGetGpuInstanceRemainingCapacity(gpu, info.id) == 0


def test_gpu_instances_and_compute_instances_walk(driver: SimulatedDriver) -> None:
    gpu = pynvml.nvmlDeviceGetHandleByIndex(0)
    info = pynvml.nvmlDeviceGetGpuInstanceProfileInfo(gpu, pynvml.NVML_GPU_INSTANCE_PROFILE_4_SLICE)
    assert info.id == 5 and info.memorySizeMB == 40448
    arr = (pynvml.c_nvmlGpuInstance_t * info.instanceCount)()
    count = pynvml.c_uint()
    pynvml.nvmlDeviceGetGpuInstances(gpu, info.id, arr, pynvml.byref(count))
    assert count.value == 1
    gi_info = pynvml.nvmlGpuInstanceGetInfo(arr[0])
    assert (gi_info.id, gi_info.profileId, gi_info.placement.start, gi_info.placement.size) == (
        1,
        5,
        0,
        4,
    )
    cis = (pynvml.c_nvmlComputeInstance_t * 1)()
    pynvml.nvmlGpuInstanceGetComputeInstances(arr[0], 3, cis, pynvml.byref(count))
    assert count.value == 1
    assert pynvml.nvmlComputeInstanceGetInfo(cis[0]).id == 0
    # 1g.10gb + 2g.20gb + 4g.40gb leaves one 1g.10gb slot and no second 2g.20gb.
    one = pynvml.nvmlDeviceGetGpuInstanceProfileInfo(gpu, pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE)
    two = pynvml.nvmlDeviceGetGpuInstanceProfileInfo(gpu, pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE)
    assert pynvml.nvmlDeviceGetGpuInstanceRemainingCapacity(gpu, one.id) == 0
    assert pynvml.nvmlDeviceGetGpuInstanceRemainingCapacity(gpu, two.id) == 0
    assert pynvml.nvmlDeviceGetGpuInstanceById(gpu, 5)
    with pytest.raises(pynvml.NVMLError_NotFound):
        pynvml.nvmlDeviceGetGpuInstanceById(gpu, 7)


def test_utilization_is_not_supported_under_mig(driver: SimulatedDriver) -> None:
    gpu = pynvml.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        pynvml.nvmlDeviceGetUtilizationRates(gpu)
    for m in mig_handles(gpu):
        with pytest.raises(pynvml.NVMLError_NotSupported):
            pynvml.nvmlDeviceGetUtilizationRates(m)
        with pytest.raises(pynvml.NVMLError_NotSupported):
            pynvml.nvmlDeviceGetDecoderUtilization(m)
    whole = pynvml.nvmlDeviceGetHandleByIndex(2)
    util = pynvml.nvmlDeviceGetUtilizationRates(whole)
    assert util.gpu == driver.gpu_state(2).utilization_gpu


def test_memory_per_mig_handle_is_the_instance_memory(driver: SimulatedDriver) -> None:
    gpu = pynvml.nvmlDeviceGetHandleByIndex(1)
    for m in mig_handles(gpu):
        gi = pynvml.nvmlDeviceGetGpuInstanceId(m)
        truth = driver.mig_state(1, gi)
        v2 = pynvml.nvmlDeviceGetMemoryInfo(m, version=pynvml.nvmlMemory_v2)
        assert v2.total == 9728 * 1024 * 1024 == truth.memory_total
        assert (v2.used, v2.free, v2.reserved) == (
            truth.memory_used,
            truth.memory_free,
            truth.memory_reserved,
        )
        v1 = pynvml.nvmlDeviceGetMemoryInfo(m)
        assert v1.used == truth.memory_used_v1 and v1.total == v2.total
    parent = pynvml.nvmlDeviceGetMemoryInfo(gpu)
    assert parent.total == 81920 * 1024 * 1024


def test_memory_v2_checks_the_struct_version(driver: SimulatedDriver) -> None:
    h = pynvml.nvmlDeviceGetHandleByIndex(2)
    with pytest.raises(pynvml.NVMLError_ArgumentVersionMismatch):
        pynvml.nvmlDeviceGetMemoryInfo(h, version=0x01000028)


def test_readings_match_ground_truth(driver: SimulatedDriver, clock: ManualClock) -> None:
    h = pynvml.nvmlDeviceGetHandleByIndex(3)
    clock.advance(250)  # before the hang fault on this GPU's temperature (at 300 s)
    s = driver.gpu_state(3)
    assert pynvml.nvmlDeviceGetPowerUsage(h) == s.power_mw
    assert pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU) == s.temperature_c
    assert pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM) == s.sm_clock_mhz
    assert pynvml.nvmlDeviceGetPerformanceState(h) == s.pstate
    assert pynvml.nvmlDeviceGetCurrentClocksEventReasons(h) == s.clocks_event_reasons
    assert pynvml.nvmlDeviceGetDecoderUtilization(h)[0] == s.decoder_util
    assert pynvml.nvmlDeviceGetTotalEnergyConsumption(h) == s.energy_mj
    assert 16_000 <= s.power_mw <= 72_000
    with pytest.raises(pynvml.NVMLError_NotSupported):
        pynvml.nvmlDeviceGetFanSpeed(h)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        pynvml.nvmlDeviceGetRetiredPages(h, 0)
    assert pynvml.nvmlDeviceGetRemappedRows(h)[1:] == (0, 0, 0)


def test_field_values_nvlink_and_energy(driver: SimulatedDriver, clock: ManualClock) -> None:
    h = pynvml.nvmlDeviceGetHandleByIndex(2)
    fields = [
        pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION,
        (pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, 0xFFFFFFFF),
        *[(pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, link) for link in range(12)],
        9999,
    ]
    v = pynvml.nvmlDeviceGetFieldValues(h, fields)
    s = driver.gpu_state(2)
    assert v[0].nvmlReturn == 0 and v[0].value.ullVal == s.energy_mj
    assert v[1].value.ullVal == s.nvlink_tx_kib
    assert sum(v[i].value.ullVal for i in range(2, 14)) == s.nvlink_tx_kib
    assert v[14].nvmlReturn == pynvml.NVML_ERROR_NOT_SUPPORTED
    clock.advance(600)
    later = pynvml.nvmlDeviceGetFieldValues(h, fields[1:2])[0].value.ullVal
    assert later > s.nvlink_tx_kib
    assert pynvml.nvmlDeviceGetNvLinkState(h, 11) == 1
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlDeviceGetNvLinkState(h, 12)


def _gpm(s1: object, s2: object, ids: list[int]) -> pynvml.c_nvmlGpmMetricsGet_t:
    mg = pynvml.c_nvmlGpmMetricsGet_t()
    mg.version = pynvml.NVML_GPM_METRICS_GET_VERSION
    mg.numMetrics = len(ids)
    mg.sample1, mg.sample2 = s1, s2
    for i, mid in enumerate(ids):
        mg.metrics[i].metricId = mid
    return pynvml.nvmlGpmMetricsGet(mg)


def test_gpm_works_per_mig_instance_on_hopper(driver: SimulatedDriver, clock: ManualClock) -> None:
    gpu = pynvml.nvmlDeviceGetHandleByIndex(0)
    assert pynvml.nvmlGpmQueryDeviceSupport(gpu).isSupportedDevice == 1
    s1, s2 = pynvml.nvmlGpmSampleAlloc(), pynvml.nvmlGpmSampleAlloc()
    t1 = clock.now()
    pynvml.nvmlGpmMigSampleGet(gpu, 5, s1)
    clock.advance(30)
    pynvml.nvmlGpmMigSampleGet(gpu, 5, s2)
    ids = [pynvml.NVML_GPM_METRIC_SM_UTIL, pynvml.NVML_GPM_METRIC_SM_OCCUPANCY, 12345]
    mg = _gpm(s1, s2, ids)
    want = driver.fleet.gpm_metrics("mixed", 0, 5, t1, t1 + 30)
    assert mg.metrics[0].nvmlReturn == 0
    assert mg.metrics[0].value == pytest.approx(want[pynvml.NVML_GPM_METRIC_SM_UTIL])
    assert mg.metrics[1].value == pytest.approx(want[pynvml.NVML_GPM_METRIC_SM_OCCUPANCY])
    assert mg.metrics[0].metricInfo.shortName == b"SM_UTIL"
    assert mg.metrics[2].nvmlReturn == pynvml.NVML_ERROR_NOT_SUPPORTED
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        _gpm(s2, s1, ids)  # sample1 must be the earlier one
    bad = pynvml.c_nvmlGpmMetricsGet_t()
    bad.version, bad.numMetrics, bad.sample1, bad.sample2 = 2, 0, s1, s2
    with pytest.raises(pynvml.NVMLError_ArgumentVersionMismatch):
        pynvml.nvmlGpmMetricsGet(bad)
    pynvml.nvmlGpmSampleFree(s1)
    pynvml.nvmlGpmSampleFree(s2)


def test_gpm_is_not_supported_on_ampere(driver: SimulatedDriver) -> None:
    gpu = pynvml.nvmlDeviceGetHandleByIndex(1)
    assert pynvml.nvmlGpmQueryDeviceSupport(gpu).isSupportedDevice == 0
    sample = pynvml.nvmlGpmSampleAlloc()
    with pytest.raises(pynvml.NVMLError_NotSupported):
        pynvml.nvmlGpmMigSampleGet(gpu, 7, sample)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        pynvml.nvmlGpmSampleGet(gpu, sample)
    pynvml.nvmlGpmSampleFree(sample)


def test_lost_gpu_fails_every_call_in_its_window_only(
    driver: SimulatedDriver, clock: ManualClock
) -> None:
    h = pynvml.nvmlDeviceGetHandleByIndex(2)
    other = pynvml.nvmlDeviceGetHandleByIndex(3)
    clock.advance(150)
    for call in (
        lambda: pynvml.nvmlDeviceGetPowerUsage(h),
        lambda: pynvml.nvmlDeviceGetMemoryInfo(h),
        lambda: pynvml.nvmlDeviceGetUUID(h),
        lambda: pynvml.nvmlDeviceGetHandleByIndex(2),
    ):
        with pytest.raises(pynvml.NVMLError_GpuIsLost):
            call()
    assert driver.gpu_state(2).lost
    assert pynvml.nvmlDeviceGetPowerUsage(other) > 0
    clock.advance(100)
    assert pynvml.nvmlDeviceGetPowerUsage(h) > 0


def test_error_fault_answers_its_code_for_its_function(
    driver: SimulatedDriver, clock: ManualClock
) -> None:
    h = pynvml.nvmlDeviceGetHandleByIndex(3)
    clock.advance(55)
    with pytest.raises(pynvml.NVMLError_NoPermission):
        pynvml.nvmlDeviceGetPowerUsage(h)
    assert pynvml.nvmlDeviceGetTemperature(h, 0) > 0  # other functions are unaffected
    clock.advance(10)
    assert pynvml.nvmlDeviceGetPowerUsage(h) > 0


def test_hang_blocks_only_its_thread_until_released(
    driver: SimulatedDriver, clock: ManualClock
) -> None:
    h = pynvml.nvmlDeviceGetHandleByIndex(3)
    clock.advance(301)
    done = threading.Event()
    result: list[object] = []

    def call() -> None:
        result.append(pynvml.nvmlDeviceGetTemperature(h, 0))
        done.set()

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    assert not done.wait(0.3)
    started = time.monotonic()
    assert pynvml.nvmlDeviceGetPowerUsage(h) > 0  # this thread is not blocked
    assert time.monotonic() - started < 0.1
    driver.release_hangs()
    assert done.wait(2.0)
    assert result and isinstance(result[0], int)


def test_xid_is_delivered_once(driver: SimulatedDriver, clock: ManualClock) -> None:
    h = pynvml.nvmlDeviceGetHandleByIndex(2)
    assert pynvml.nvmlDeviceGetSupportedEventTypes(h) & pynvml.nvmlEventTypeXidCriticalError
    es = pynvml.nvmlEventSetCreate()
    pynvml.nvmlDeviceRegisterEvents(h, pynvml.nvmlEventTypeXidCriticalError, es)
    with pytest.raises(pynvml.NVMLError_Timeout):
        pynvml.nvmlEventSetWait(es, 0)
    clock.advance(31)
    data = pynvml.nvmlEventSetWait(es, 0)
    assert data.eventType == pynvml.nvmlEventTypeXidCriticalError
    assert data.eventData == 79
    assert pynvml.nvmlDeviceGetUUID(data.device) == pynvml.nvmlDeviceGetUUID(h)
    with pytest.raises(pynvml.NVMLError_Timeout):
        pynvml.nvmlEventSetWait(es, 10)
    pynvml.nvmlEventSetFree(es)


def test_overheat_forces_temperature_and_thermal_reasons(
    driver: SimulatedDriver, clock: ManualClock
) -> None:
    h = pynvml.nvmlDeviceGetHandleByIndex(2)
    clock.advance(450)
    assert pynvml.nvmlDeviceGetTemperature(h, 0) == 93
    reasons = pynvml.nvmlDeviceGetCurrentClocksEventReasons(h)
    assert reasons & pynvml.nvmlClocksEventReasonSwThermalSlowdown


def test_driver_not_loaded_then_reinit(clock: ManualClock) -> None:
    install(load_fleet(SMALL), "flaky", clock)
    try:
        pynvml.nvmlInit()
        clock.advance(15)
        with pytest.raises(pynvml.NVMLError_Uninitialized):
            pynvml.nvmlDeviceGetCount()
        with pytest.raises(pynvml.NVMLError_DriverNotLoaded):
            pynvml.nvmlInit()
        clock.advance(10)
        with pytest.raises(pynvml.NVMLError_Uninitialized):
            pynvml.nvmlDeviceGetCount()  # still needs a fresh nvmlInit
        pynvml.nvmlInit()
        assert pynvml.nvmlDeviceGetCount() == 1
    finally:
        uninstall()


def test_missing_function_is_function_not_found(driver: SimulatedDriver) -> None:
    h = pynvml.nvmlDeviceGetHandleByIndex(2)
    with pytest.raises(pynvml.NVMLError_FunctionNotFound):
        pynvml.nvmlDeviceGetBAR1MemoryInfo(h)


def test_running_processes_use_the_two_call_protocol(driver: SimulatedDriver) -> None:
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    assert pynvml.nvmlDeviceGetComputeRunningProcesses(h) == []
    assert pynvml.nvmlDeviceGetGraphicsRunningProcesses(h) == []
    assert pynvml.nvmlDeviceGetMPSComputeRunningProcesses_v3(h) == []


def test_uninstall_leaves_pynvml_without_a_library(clock: ManualClock) -> None:
    install(load_fleet(SMALL), "mixed", clock)
    pynvml.nvmlInit()
    uninstall()
    assert pynvml.nvmlLib is None
    assert pynvml._nvmlGetFunctionPointer_cache == {}


def test_same_seed_gives_the_same_values() -> None:
    a, b = load_fleet(SMALL), load_fleet(SMALL)
    for t in (T0, T0 + 1234.5, T0 + 86400 * 3):
        assert a.gpu_state("mixed", 0, t) == b.gpu_state("mixed", 0, t)
        assert a.mig_state("mixed", 1, 9, t) == b.mig_state("mixed", 1, 9, t)
    assert [g.uuid for g in a.nodes["mixed"].gpus] == [g.uuid for g in b.nodes["mixed"].gpus]
    text = SMALL.read_text().replace("seed: 11", "seed: 12")
    import yaml

    c = parse_fleet(yaml.safe_load(text), "other")
    assert c.gpu_state("mixed", 2, T0) != a.gpu_state("mixed", 2, T0)


def test_energy_is_monotonic_and_follows_power() -> None:
    fleet = load_fleet(SMALL)
    for gpu in (0, 2, 3):
        last = -1
        powers = []
        start = T0 + 86400 - 3 * 3600  # crosses a UTC midnight
        for k in range(6 * 60):
            t = start + 60 * k
            s = fleet.gpu_state("mixed", gpu, t)
            assert s.energy_mj >= last
            last = s.energy_mj
            powers.append(s.power_mw)
        first = fleet.energy_mj("mixed", gpu, start)
        mean_w = sum(powers) / len(powers) / 1000
        got_w = (last - first) / 1000 / (60 * (6 * 60 - 1))
        assert got_w == pytest.approx(mean_w, rel=0.15)


def test_idle_spells_are_where_activity_is_below_five_percent() -> None:
    fleet = load_fleet(SMALL)
    start, end = T0, T0 + 2 * 86400
    for gpu, gi in ((2, None), (1, 9), (3, None)):
        spells = fleet.idle_spells("mixed", gpu, gi, start, end)
        assert spells, "the patterns schedule idle spells within two days"
        assert any(b - a >= 1800 for a, b in spells) or gpu == 3
        for t in range(int(start), int(end), 97):
            inside = any(a <= t < b for a, b in spells)
            assert (fleet.activity("mixed", gpu, gi, t) < 5.0) == inside


def test_mig_parent_activity_is_slice_weighted() -> None:
    fleet = load_fleet(SMALL)
    t = T0 + 777
    want = sum(fleet.activity("mixed", 0, gi, t) * s for gi, s in ((1, 4), (5, 2), (13, 1))) / 7
    assert fleet.activity("mixed", 0, None, t) == pytest.approx(want)
    assert fleet.gpu_state("mixed", 0, t).activity == fleet.activity("mixed", 0, None, t)


@pytest.mark.parametrize(
    ("doc", "fragment"),
    [
        ({"seed": 1, "nodes": [{"name": "a", "gpus": [{"model": "A100"}]}]}, "gpus[0].model"),
        ({"seed": 1, "nodes": [{"name": "a", "gpu": []}]}, "unknown key 'gpu'"),
        (
            {"seed": 1, "nodes": [{"name": "a", "gpus": [{"model": "L4", "mig": "7x1g.10gb"}]}]},
            "does not support MIG",
        ),
        (
            {
                "seed": 1,
                "nodes": [
                    {"name": "a", "gpus": [{"model": "H100-80GB-HBM3", "mig": ["4g.40gb"] * 2}]}
                ],
            },
            "does not fit",
        ),
        (
            {
                "seed": 1,
                "nodes": [
                    {
                        "name": "a",
                        "gpus": [{"model": "L4", "workload": {"pattern": "training", "bse": 1}}],
                    }
                ],
            },
            "workload.bse",
        ),
        (
            {
                "seed": 1,
                "nodes": [
                    {
                        "name": "a",
                        "gpus": [{"model": "L4"}],
                        "faults": [{"gpu": 0, "kind": "error", "function": "nvmlNope", "at": 1}],
                    }
                ],
            },
            "faults[0].function",
        ),
        ({"nodes": []}, "seed"),
    ],
)
def test_fleet_validation_names_file_and_key(doc: object, fragment: str) -> None:
    with pytest.raises(FleetError) as err:
        parse_fleet(doc, "bad-fleet.yaml")
    assert str(err.value).startswith("bad-fleet.yaml: ")
    assert fragment in str(err.value)


def test_load_fleet_reports_bad_yaml_with_the_path(tmp_path: Path) -> None:
    p = tmp_path / "broken.yaml"
    p.write_text("seed: [1\n")
    with pytest.raises(FleetError, match=r"broken\.yaml"):
        load_fleet(p)


def test_shipped_fleets_load() -> None:
    for path in (
        ROOT / "examples" / "fleet.yaml",
        ROOT / "bench" / "fleets" / "h100-mig-node.yaml",
        ROOT / "bench" / "fleets" / "a100-node.yaml",
    ):
        fleet = load_fleet(path)
        assert fleet.nodes
