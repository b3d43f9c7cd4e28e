"""``.ci/gpu`` on a machine without a GPU: it says so, still writes its log under $OUT, and exits
2 (docs/DESIGN.md, "Triton without a GPU"). A fake ``nvidia-smi`` stands for a driver that
answers while torch sees no CUDA device."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.scripts import script_environment

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_logs_and_exits_2(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    nvidia_smi = fake_bin / "nvidia-smi"
    nvidia_smi.write_text("#!/bin/sh\necho 'name, driver_version'\necho 'Fake GPU, 0.0'\n")
    nvidia_smi.chmod(0o755)
    out = tmp_path / "out"
    environment = script_environment(OUT=str(out), PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    environment["PATH"] = f"{fake_bin}:{environment['PATH']}"
    run = subprocess.run(
        [str(ROOT / ".ci" / "gpu")], env=environment, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 2, run.stderr
    log = (out / "gpu.log").read_text()
    assert "Fake GPU" in log
    assert "no CUDA GPU is visible" in log
    assert "exit status 2" in log
    assert (out / "steps.tsv").read_text().splitlines()[-1].split("\t")[:2] == ["gpu", "2"]
