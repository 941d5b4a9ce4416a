"""``lowrank.info()`` / ``python -m lowrank info``: what was built and what this machine can run."""

from __future__ import annotations

import platform

import torch

from . import _C


def cpu_model() -> str:
    """The CPU's model name as lscpu prints it (what every reported number is labelled with)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def info(calibrate: bool = False) -> dict:
    """Version, torch version, CUDA build and devices, the CPU kernel variant chosen, threads, and the
    code-path decisions taken so far, by this process or cached on disk for this machine
    (``calibrate=True`` takes them all now; see ``lowrank/ops/_dispatch.py``)."""
    from .ops import _dispatch

    if calibrate:
        _dispatch.calibrate()
    decisions = _dispatch.report(include_disk=True)
    b = _C.build_info()
    gpu_usable = bool(b["cuda_compiled"]) and torch.cuda.is_available() and b["cuda_device_count"] > 0
    return {
        "version": b["version"],
        "torch": torch.__version__,
        "cuda_kernels_compiled": bool(b["cuda_compiled"]),
        "cuda_architectures": b["cuda_architectures"] or None,
        "cuda_runtime_version": b["cuda_runtime_version"] or None,
        "gpu_usable": gpu_usable,
        "gpu_name": torch.cuda.get_device_name(0) if gpu_usable else None,
        "cpu_kernel_variant": _C.cpu_isa(),
        "cpu_variants_supported": list(_C.supported_cpu_isas()),
        "cpu_variants_compiled": list(b["cpu_variants_compiled"]),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "calibration": _dispatch.mode(),
        "calibration_key": _dispatch.cache_key(),
        "dispatch": {name: d["value"] for name, d in decisions.items()},
        "dispatch_timings_ms": {name: d["timings_ms"] for name, d in decisions.items()},
    }
