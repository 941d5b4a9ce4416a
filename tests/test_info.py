"""lowrank.info() and ``python -m lowrank info``: what was built and what this machine can run."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

import lowrank
from lowrank import _C

EXPECTED_KEYS = {
    "version",
    "torch",
    "cuda_kernels_compiled",
    "cuda_architectures",
    "cuda_runtime_version",
    "gpu_usable",
    "gpu_name",
    "cpu_kernel_variant",
    "cpu_variants_supported",
    "cpu_variants_compiled",
    "torch_cpu_capability",
    "threads",
}


def test_info_keys_and_values():
    report = lowrank.info()
    assert EXPECTED_KEYS <= set(report)
    assert report["version"] == lowrank.__version__
    assert report["torch"] == torch.__version__
    assert report["cpu_kernel_variant"] == _C.cpu_isa()
    assert report["cpu_kernel_variant"] in report["cpu_variants_supported"]
    assert set(report["cpu_variants_supported"]) <= set(report["cpu_variants_compiled"])
    assert "portable" in report["cpu_variants_supported"]
    assert report["threads"] == torch.get_num_threads()
    assert isinstance(report["cuda_kernels_compiled"], bool) and isinstance(report["gpu_usable"], bool)
    if not torch.cuda.is_available():
        assert report["gpu_usable"] is False and report["gpu_name"] is None
    json.dumps(report)  # plain data


def test_cpu_only_build_when_expected():
    """LOWRANK_EXPECT_CPU_ONLY=1 (CI's LOWRANK_CUDA=OFF build): no CUDA kernels compiled, nothing CUDA used."""
    import os

    from lowrank.ops.lora import HAS_CUDA_KERNELS

    report = lowrank.info()
    if os.environ.get("LOWRANK_EXPECT_CPU_ONLY") == "1":
        assert report["cuda_kernels_compiled"] is False and not HAS_CUDA_KERNELS
        assert report["cuda_architectures"] is None and report["gpu_usable"] is False
    else:
        assert report["cuda_kernels_compiled"] == HAS_CUDA_KERNELS


def test_info_follows_the_active_cpu_variant(cpu_isa):
    assert lowrank.info()["cpu_kernel_variant"] == cpu_isa


def _run_cli(*args, env_isa=None):
    import os

    env = dict(os.environ)
    if env_isa is not None:
        env["LOWRANK_CPU_ISA"] = env_isa
    cmd = [sys.executable, "-m", "lowrank", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def test_cli_info_prints_cpu_variant():
    result = _run_cli("info")
    assert result.returncode == 0, result.stderr
    lines = dict((line.split(None, 1) + [""])[:2] for line in result.stdout.splitlines() if line.strip())
    assert EXPECTED_KEYS <= set(lines)
    assert lines["cpu_kernel_variant"].strip() in _C.supported_cpu_isas()


def test_cli_info_json_and_env_override():
    result = _run_cli("info", "--json", env_isa="portable")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert EXPECTED_KEYS <= set(report)
    assert report["cpu_kernel_variant"] == "portable"  # LOWRANK_CPU_ISA forces a lower variant


def test_cli_rejects_unknown_command():
    result = _run_cli("frobnicate")
    assert result.returncode != 0 and "invalid choice" in result.stderr
