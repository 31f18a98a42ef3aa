"""bench/gpu_check.py: its CPU smoke mode runs every table; without CUDA the real check stops with one line."""

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT

SCRIPT = os.path.join(REPO_ROOT, "bench", "gpu_check.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_tiny_smoke_mode_prints_every_table():
    proc = subprocess.run([sys.executable, SCRIPT, "--device=cpu", "--tiny", "--precisions=fp32,fp16"], env=ENV,
                          capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| tiny16 |")]
    # 2 precisions x (off, fast) step rows, then (off, fast) sampling rows
    assert len(rows) == 6, proc.stdout
    assert all(float(r.split("|")[5]) > 0 for r in rows[:4]), "img/s"
    assert all(float(r.split("|")[9]) > 0 for r in rows[:4]), "FLOPs per step"
    assert "fp16 vs fp32 loss, tiny16, batch 4, 3 steps" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_without_cuda_the_check_says_so():
    proc = subprocess.run([sys.executable, SCRIPT], env=ENV, capture_output=True, text=True, timeout=120,
                          cwd=REPO_ROOT)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "needs a CUDA GPU" in proc.stderr and "--device=cpu --tiny" in proc.stderr
