"""GPU detection: the real probes on this machine, and how the sources combine into one report.

The machine has no GPU, so the device-present cases feed `combine` what torch and NVML report on
one (the only stand-in: hardware that cannot run here)."""

from __future__ import annotations

import pytest
import torch

from node.doctor import check_gpu
from node.gpu import GpuDevice, GpuReport, Probe, combine, detect_gpus, parse_proc_driver_version, probe_nvml

H200 = GpuDevice(0, "NVIDIA H200", 150_117_924_864, "9.0")
PROC_TEXT = ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n"
             "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")
OPEN_KERNEL_TEXT = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a usable GPU")
def test_this_machine_reports_cpu_with_a_reason():
    report = detect_gpus()
    assert not report.usable and report.count == 0
    assert report.reason
    info = report.to_proto()
    assert info.name == "cpu" and info.count == 0 and info.memory_bytes == 0
    assert report.summary().startswith("no GPU: ")


def test_nvml_absent_or_empty_is_a_reason_not_an_error():
    probe = probe_nvml()
    assert probe.devices or probe.reason


def test_proc_driver_version_formats():
    assert parse_proc_driver_version(PROC_TEXT) == "550.54.15"
    assert parse_proc_driver_version(OPEN_KERNEL_TEXT) == "570.86.15"
    assert parse_proc_driver_version("garbage") == ""


def test_usable_gpus_fill_the_advert():
    second = GpuDevice(1, "NVIDIA H200", 150_000_000_000, "9.0")
    report = combine(Probe((H200, second), ""), "12.8", Probe((), "not installed"), "550.54.15")
    assert report.usable and report.driver == "550.54.15"
    info = report.to_proto()
    assert (info.name, info.count, info.memory_bytes, info.compute_capability, info.driver) == (
        "NVIDIA H200", 2, 150_000_000_000, "9.0", "550.54.15")
    assert "2 x NVIDIA H200" in report.summary() and "CUDA 12.8" in report.summary()
    assert check_gpu(report, "cuda", require_gpu=True).status == "ok"


def test_mixed_devices_report_the_weakest_bound():
    blackwell = GpuDevice(1, "NVIDIA B200", 190_000_000_000, "10.0")
    report = combine(Probe((H200, blackwell), ""), "12.8", Probe((), ""), "")
    assert report.compute_capability == "9.0"  # numeric, not string order ("10.0" < "9.0" as text)
    assert report.memory_bytes == H200.memory_bytes
    assert report.name == "NVIDIA B200 + NVIDIA H200"


def test_gpu_torch_cannot_use_is_named_and_nvml_driver_kept():
    report = combine(Probe((), "torch 2.13.0+cpu is a CPU-only build"), "",
                     Probe((H200,), "", driver="570.86.15"), "")
    assert not report.usable and report.count == 0 and report.to_proto().name == "cpu"
    assert "CPU-only build" in report.reason and "exposes 1 GPU(s) (NVIDIA H200)" in report.reason
    assert report.driver == "570.86.15"


def test_check_gpu_severity():
    none = GpuReport((), False, "", "", "torch 2.13.0+cpu is a CPU-only build")
    assert check_gpu(none, "cpu", require_gpu=False).status == "warn"
    assert check_gpu(none, "cpu", require_gpu=True).status == "fail"
    assert check_gpu(none, "cuda:0", require_gpu=False).status == "fail"
