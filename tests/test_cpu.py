"""gpt/cpu.py: the thread count a run takes on 1-, 2- and 4-core machines, and no page faults between steps."""

import os
import shutil
import subprocess
import sys

import pytest
from helpers import REPO

from gpt import cpu


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """A machine with `cores` usable cores, its cgroup files in tmp_path (none yet: no quota), and
    no OMP_NUM_THREADS."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu, "CGROUP", tmp_path)

    def with_cores(cores: int):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
        return tmp_path

    return with_cores


@pytest.mark.parametrize("cores", [1, 2, 4])
def test_one_process_takes_every_usable_core(machine, cores):
    machine(cores)
    assert cpu.training_threads() == cores


@pytest.mark.parametrize("cores, processes, threads", [(4, 2, 2), (4, 4, 1), (2, 4, 1), (4, 3, 1)])
def test_processes_on_one_machine_share_its_cores(machine, cores, processes, threads):
    machine(cores)
    assert cpu.training_threads(processes) == threads


@pytest.mark.parametrize(
    "files, quota, threads",
    [
        ({"cpu.max": "150000 100000\n"}, 1.5, 2),  # cgroup v2: 1.5 CPUs' worth -> 2 threads
        ({"cpu.max": "max 100000\n"}, None, 4),  # v2 without a quota
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1.0, 1),  # cgroup v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None, 4),  # v1 without
        ({}, None, 4),  # no cgroup files at all
    ],
)
def test_a_container_cpu_quota_caps_the_threads(machine, files, quota, threads):
    root = machine(4)
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    assert cpu.cgroup_cpu_quota() == quota
    assert cpu.training_threads() == threads


def test_omp_num_threads_wins(machine, monkeypatch):
    machine(4)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu.training_threads(2) == 3


@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset (util-linux)")
def test_a_process_pinned_to_one_core_trains_on_one_thread():
    script = "import torch; from gpt.cpu import use_cpu; print(use_cpu(), torch.get_num_threads())"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    result = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "1"]


# Trains a small model whose activations are larger than malloc's default mmap threshold (128 KiB)
# and prints the page faults of 10 steps after 5 steps of warm-up.
FAULTS_PER_STEP = """
import resource, sys, torch
from gpt.cpu import keep_freed_memory
from gpt.model import GPTConfig
from gpt.step import build_model, configure_optimizer, train_step
torch.set_num_threads(1)
if sys.argv[1] == "keep":
    assert keep_freed_memory()
config = GPTConfig(vocab_size=4000, block_size=128, n_layer=2, n_head=4, d_model=128, attn="sdpa",
                   adaptive_cutoffs=[500, 2000])
model = build_model(config, "cpu", 0)
optimizer = configure_optimizer(model, 1e-3, 0.1, "cpu", muon=True)
x, y = (torch.randint(0, 4000, (16, 128), generator=torch.Generator().manual_seed(i)) for i in range(2))
for _ in range(5):
    train_step(model, optimizer, [(x, y)], lr=1e-3)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    train_step(model, optimizer, [(x, y)], lr=1e-3)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts Linux page faults of glibc's malloc")
def test_kept_memory_ends_the_page_faults_between_steps():
    """By default glibc hands each step's freed activations back to the kernel and faults them in
    again in the next step; with keep_freed_memory a step reuses the previous step's pages."""
    faults = {}
    for mode in ("default", "keep"):
        result = subprocess.run(
            [sys.executable, "-c", FAULTS_PER_STEP, mode], cwd=REPO, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr
        faults[mode] = float(result.stdout)
    assert faults["default"] > 1000  # the storm this avoids: a fault per fresh 4 KiB page of activations
    assert faults["keep"] * 10 < faults["default"], faults
