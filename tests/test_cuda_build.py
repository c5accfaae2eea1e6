"""The CUDA wgmma kernel as ptxas builds it for Hopper, for every config `w2a8_matmul` picks or plans: no wgmma
serialized and no registers spilled. ptxas reports serialization only as a "Potential Performance Loss" note (C75xx),
which NVRTC never shows; a serialized kernel is still exact, only slower (stop 22's ran 17% slower on the 2B4T
gate+up shape at 2,048 rows). Needs nvcc, not a GPU; skipped without nvcc."""

from __future__ import annotations

import shutil
import subprocess
from importlib import resources
from pathlib import Path

import pytest

from bitnet158.kernels import gpu_wgmma

NVCC = shutil.which("nvcc")


def _configs() -> list[gpu_wgmma.Config]:
    picked = {config for ranges in gpu_wgmma.PICKED.values() for _, _, config in ranges}
    planned = {gpu_wgmma.plan(m, r, kp) for m in (2, 64, 2048) for r, kp in gpu_wgmma.PICKED}
    return sorted(picked | planned)


@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
def test_wgmma_kernel_builds_without_serialized_wgmma_or_spills(tmp_path: Path):
    kernels = resources.files("bitnet158.kernels")
    configs = _configs()
    # Taking each instance's address makes nvcc compile it, as NVRTC does for the name it is asked for.
    instances = "".join(f"  (void)&w2a8_wgmma<{', '.join(map(str, config))}>;\n" for config in configs)
    source = tmp_path / "w2a8_wgmma.cu"
    source.write_text(kernels.joinpath("cuda_common.cuh").read_text() + kernels.joinpath("w2a8_wgmma.cu").read_text()
                      + "void instantiate() {\n" + instances + "}\n")
    build = subprocess.run(
        [NVCC, "-gencode=arch=compute_90a,code=sm_90a", "-cubin", "-Xptxas", "-v", str(source),
         "-o", str(tmp_path / "w2a8_wgmma.cubin")],
        capture_output=True, text=True, timeout=600,
    )
    log = build.stdout + build.stderr
    assert build.returncode == 0, log
    assert log.count("Compiling entry function") == len(configs), log
    assert "Potential Performance Loss" not in log, log
    spills = [line for line in log.splitlines() if "spill stores" in line]
    assert len(spills) == len(configs) and all(" 0 bytes spill stores, 0 bytes spill loads" in line
                                               for line in spills), log
