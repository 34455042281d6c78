"""The `cuda` marker (pytest.ini, conftest.py): `pytest -m cuda` selects the CUDA-only tests (bench.quick
runs them first on a GPU), and without a GPU each of them is skipped, saying why."""

import subprocess
import sys

import pytest
import torch
from helpers import REPO

# CUDA-only tests that must stay marked: if one loses the marker, a GPU run no longer runs it.
KNOWN_CUDA_ONLY = {
    "tests/test_attention_memory.py::test_triton_memory_is_linear[triton]",
    "tests/test_attention_memory.py::test_triton_memory_is_linear[reference]",
    "tests/test_triton_attention.py::test_cuda_batch_times_heads_beyond_one_grid_axis",
    "tests/test_triton_attention.py::test_cuda_every_variant_compiles_once_for_every_value",
    "tests/test_triton_decode.py::test_cuda_growing_cache_compiles_nothing_new",
}


def pytest_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_marker_selects_the_cuda_only_tests():
    done = pytest_run("--collect-only", "-q", "-m", "cuda", "tests")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    selected = {line for line in done.stdout.splitlines() if "::" in line}
    assert KNOWN_CUDA_ONLY <= selected, KNOWN_CUDA_ONLY - selected
    assert "tests/test_model.py" not in done.stdout  # a CPU test is not selected


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the marked tests run")
def test_without_a_gpu_marked_tests_are_skipped_with_the_reason():
    done = pytest_run("-q", "-rs", "-m", "cuda", "tests/test_attention_memory.py")
    assert done.returncode == 0, done.stdout[-3000:]
    assert "2 skipped" in done.stdout and "needs a CUDA GPU" in done.stdout
