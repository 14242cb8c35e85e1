"""What benchmarks print about the machine, GPUs' peak FLOP/s (for MFU), and the process's peak memory on CPU."""
from __future__ import annotations

import platform
import resource
from pathlib import Path
from typing import Optional

# Dense peak TFLOP/s per device: (bf16, fp32 matmul). Matched by substring of the device name.
GPU_PEAK_TFLOPS = [
    ("H200", (989.0, 67.0)),
    ("H100 PCIe", (756.0, 51.0)),
    ("H100", (989.0, 67.0)),
    ("GH200", (989.0, 67.0)),
    ("B200", (2250.0, 80.0)),
    ("A100", (312.0, 19.5)),
    ("A10G", (125.0, 31.2)),
    ("L40S", (362.0, 91.6)),
    ("L4", (121.0, 30.3)),
    ("V100", (125.0, 15.7)),
    ("MI300X", (1307.0, 163.4)),
    ("MI250X", (383.0, 47.9)),
]


def gpu_peak_tflops(device_name: str, bf16: bool = True) -> Optional[float]:
    """Dense peak TFLOP/s of a GPU named `device_name` (bf16 or fp32 matmul), None when unknown."""
    for key, (half, single) in GPU_PEAK_TFLOPS:
        if key in device_name:
            return half if bf16 else single
    return None


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss() -> int:
    """Peak resident set size of this process in bytes (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> int:
    """Reset the peak RSS to the current RSS where Linux allows it (a forked child otherwise starts
    with its parent's peak) and return it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return peak_rss()
