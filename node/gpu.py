"""What accelerator this machine has, for the capacity advert, the dashboard and `doctor`; and how much
of its memory this node holds, for the dashboard.

Two sources, because each sees something the other cannot: torch says whether CUDA is *usable*
(a CPU-only wheel or a container started without GPUs sees nothing), NVML says what the driver
exposes and its version even when torch cannot use it. NVML is optional (`pynvml` from the
`nvidia-ml-py` package, only if importable); /proc/driver/nvidia/version gives the driver without it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from dspark.v1.advert_pb2 import GpuInfo

log = logging.getLogger(__name__)

PROC_DRIVER_VERSION = Path("/proc/driver/nvidia/version")
_PROC_DRIVER_RE = re.compile(r"Kernel Module\s+(?:for\s+\S+\s+)?([0-9][0-9.]*)")


@dataclass(frozen=True)
class GpuDevice:
    index: int
    name: str
    memory_bytes: int
    compute_capability: str  # "9.0"; "" when only NVML saw it and could not say


@dataclass(frozen=True)
class Probe:
    """What one source saw: its devices, or none and the reason."""
    devices: tuple[GpuDevice, ...]
    reason: str
    driver: str = ""


@dataclass(frozen=True)
class GpuReport:
    devices: tuple[GpuDevice, ...]
    usable: bool           # torch can run CUDA kernels on `devices`
    driver: str            # NVIDIA driver version, "" if unknown
    cuda_runtime: str      # CUDA version torch was built for, "" for a CPU build
    reason: str            # why there is no usable GPU ("" when usable)

    @property
    def count(self) -> int:
        return len(self.devices) if self.usable else 0

    @property
    def name(self) -> str:
        if not self.usable:
            return "cpu"
        names = sorted({d.name for d in self.devices})
        return " + ".join(names)

    @property
    def memory_bytes(self) -> int:
        """Per device; the smallest, since that is what a job placed on any of them can count on."""
        return min(d.memory_bytes for d in self.devices) if self.usable else 0

    @property
    def compute_capability(self) -> str:
        if not self.usable:
            return ""
        # Numeric order: "10.0" is newer than "9.0"; the oldest device bounds what kernels can run.
        return min((d.compute_capability for d in self.devices),
                   key=lambda cc: tuple(int(part) for part in cc.split(".")))

    def summary(self) -> str:
        if self.usable:
            gib = self.memory_bytes / 2**30
            return (f"{self.count} x {self.name} ({gib:.0f} GiB, compute {self.compute_capability}), "
                    f"driver {self.driver or 'unknown'}, CUDA {self.cuda_runtime}")
        return f"no GPU: {self.reason}"

    def to_proto(self) -> GpuInfo:
        return GpuInfo(name=self.name, count=self.count, memory_bytes=self.memory_bytes,
                       compute_capability=self.compute_capability, driver=self.driver)


def parse_proc_driver_version(text: str) -> str:
    """Driver version from /proc/driver/nvidia/version ("NVRM version: NVIDIA UNIX x86_64 Kernel
    Module  550.54.15  ..."), "" if the text is not in that form."""
    match = _PROC_DRIVER_RE.search(text)
    return match.group(1) if match else ""


def probe_torch() -> tuple[Probe, str]:
    """Devices torch can use, and the CUDA version torch was built for ("" for a CPU build)."""
    try:
        import torch
    except ImportError as exc:
        return Probe((), f"torch is not importable ({exc})"), ""
    cuda = torch.version.cuda or ""
    if not cuda:
        return Probe((), f"torch {torch.__version__} is a CPU-only build"), ""
    if not torch.cuda.is_available():
        return Probe((), f"torch {torch.__version__} (CUDA {cuda}) sees no usable GPU: no NVIDIA driver, "
                         "CUDA_VISIBLE_DEVICES hides them, or the container was started without GPUs"), cuda
    devices = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        devices.append(GpuDevice(i, props.name, int(props.total_memory), f"{props.major}.{props.minor}"))
    return Probe(tuple(devices), ""), cuda


def probe_nvml() -> Probe:
    try:
        import pynvml
    except ImportError:
        return Probe((), "NVML bindings (nvidia-ml-py) not installed")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return Probe((), f"NVML unavailable ({exc})")
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        devices = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            devices.append(GpuDevice(i, _text(pynvml.nvmlDeviceGetName(handle)),
                                     int(pynvml.nvmlDeviceGetMemoryInfo(handle).total), f"{major}.{minor}"))
        return Probe(tuple(devices), "" if devices else "NVML reports 0 GPUs", _text(driver))
    except pynvml.NVMLError as exc:
        return Probe((), f"NVML query failed ({exc})")
    finally:
        pynvml.nvmlShutdown()


def _text(value: str | bytes) -> str:
    # Older pynvml releases return bytes.
    return value.decode() if isinstance(value, bytes) else value


def read_proc_driver(path: Path = PROC_DRIVER_VERSION) -> str:
    try:
        return parse_proc_driver_version(path.read_text())
    except OSError:
        return ""


def combine(torch_probe: Probe, cuda_runtime: str, nvml_probe: Probe, proc_driver: str) -> GpuReport:
    """One report from the sources: torch decides usability, NVML or /proc fills in the driver, and
    when torch cannot use a GPU that NVML sees, the reason says so (the fix differs: a CUDA wheel)."""
    driver = nvml_probe.driver or proc_driver
    if torch_probe.devices:
        return GpuReport(torch_probe.devices, True, driver, cuda_runtime, "")
    reason = torch_probe.reason
    if nvml_probe.devices:
        reason += (f"; the driver exposes {len(nvml_probe.devices)} GPU(s) ({nvml_probe.devices[0].name}) "
                   "that torch cannot use")
    return GpuReport(nvml_probe.devices, False, driver, cuda_runtime, reason)


@dataclass(frozen=True)
class DeviceMemory:
    index: int
    name: str
    reserved_bytes: int    # held by torch's caching allocator: this node's share of the GPU, less CUDA's own
    allocated_bytes: int   # in live tensors; the rest of `reserved_bytes` is cache torch reuses without asking
    total_bytes: int


@dataclass(frozen=True)
class GpuMemory:
    """GPU memory this process holds, per CUDA device, or none and why."""
    devices: tuple[DeviceMemory, ...]
    reason: str            # why there is nothing to report ("" when `devices` says it)


def memory_in_use(engine_device: str) -> GpuMemory:
    """What this process holds on each CUDA device. `engine_device` is EngineInfo.device ("cpu" or the
    GPU's name): a node decoding on the CPU holds no GPU memory even on a machine that has GPUs.

    Reads torch's allocator counters only, which touch neither the GPU nor other processes: cheap
    enough for every dashboard refresh."""
    if engine_device == "cpu":
        return GpuMemory((), "the engine runs on the CPU")
    import torch
    devices = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        devices.append(DeviceMemory(i, props.name, int(torch.cuda.memory_reserved(i)),
                                    int(torch.cuda.memory_allocated(i)), int(props.total_memory)))
    return GpuMemory(tuple(devices), "")


def detect_gpus() -> GpuReport:
    torch_probe, cuda_runtime = probe_torch()
    report = combine(torch_probe, cuda_runtime, probe_nvml(), read_proc_driver())
    log.info("accelerator: %s", report.summary())
    return report
