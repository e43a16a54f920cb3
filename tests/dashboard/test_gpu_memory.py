"""GPU memory in use, as the dashboard's status reports it. No GPU here: torch.cuda's calls are stood in for."""

from __future__ import annotations

from node.gpu import DeviceMemory, GpuMemory, memory_in_use

from .factories import GIB


def test_a_node_on_the_cpu_says_it_holds_no_gpu_memory_and_why():
    assert memory_in_use("cpu") == GpuMemory((), "the engine runs on the CPU")


def test_a_node_on_a_gpu_reports_reserved_and_allocated_memory_of_each_device(two_gpus):
    assert memory_in_use("NVIDIA H200") == GpuMemory((
        DeviceMemory(0, "NVIDIA H200", reserved_bytes=30 * GIB, allocated_bytes=24 * GIB, total_bytes=141 * GIB),
        DeviceMemory(1, "NVIDIA H200", reserved_bytes=0, allocated_bytes=0, total_bytes=141 * GIB)), "")
