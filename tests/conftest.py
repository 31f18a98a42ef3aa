"""Shared test fixtures: the golden EDM vectors in ../shared/edm_vectors (skipped cleanly when absent)."""

import os

import pytest
import torch

# One torch thread per test process (and, through the environment, per subprocess such as torchrun ranks and
# DataLoader workers). The suite's networks are tiny, so threads gain little; on a machine whose other cores are
# busy (CI runners, parallel subprocess tests) two OpenMP threads were measured ~100x slower per convolution
# than one, because of spin-waiting at each parallel region.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EDM_VECTORS = os.environ.get("PID_EDM_VECTORS", os.path.join(os.path.dirname(REPO_ROOT), "shared", "edm_vectors"))


@pytest.fixture(scope="session")
def edm_vectors() -> str:
    """Path of the golden-data folder produced by EDM's own code; tests using it skip when it is absent."""
    if not os.path.isdir(EDM_VECTORS):
        if os.environ.get("PID_REQUIRE_VECTORS"):  # set by .ci/run: CI must never skip these
            pytest.fail(f"golden EDM vectors not found at {EDM_VECTORS}")
        pytest.skip(f"golden EDM vectors not found at {EDM_VECTORS} (CI always has them)")
    return EDM_VECTORS
