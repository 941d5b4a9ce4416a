"""``lowrank.info()`` / ``python -m lowrank info``: what was built and what this machine can run."""

from __future__ import annotations

import hashlib
import platform

import torch

from . import _C


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    """The CPU's model name as lscpu prints it, with its family and model numbers where /proc/cpuinfo has
    them (what every reported number is labelled with: a VM may report only "AMD EPYC", where family 25
    model 17 is a Zen 4 and family 26 model 2 a Zen 5)."""
    fields = _cpuinfo()
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def cpu_identity() -> str:
    """What tells one CPU's timings from another's, for keying measured decisions: the model name, the
    vendor's family / model / stepping, the cache size and a digest of the feature flags. VMs on
    different hosts can share a model name ("AMD EPYC" on a Zen 4 and on a Zen 5): the numbers and the
    flags tell them apart."""
    fields = _cpuinfo()
    if not fields:
        return cpu_model()
    parts = [fields.get("model name", "?"), fields.get("vendor_id", "?")]
    parts += [f"{k} {fields[k]}" for k in ("cpu family", "model", "stepping", "cache size") if k in fields]
    flags = " ".join(sorted(fields.get("flags", "").split()))
    if flags:
        parts.append("flags " + hashlib.sha256(flags.encode()).hexdigest()[:12])
    return ", ".join(parts)


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
