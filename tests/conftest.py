"""Fixtures shared by the test modules (helper functions live in tests/helpers.py)."""

from pathlib import Path

import pytest
import torch
from helpers import tiny_args, write_corpus


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus.txt")


@pytest.fixture
def stopped_run(corpus, tmp_path) -> Path:
    """An out/ directory holding the checkpoint of a tiny run stopped after 2 of 4 steps."""
    from gpt import train

    out = tmp_path / "stopped"
    assert train.main(tiny_args(corpus, out, "--steps", "4", "--stop-at", "2")) == 0
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread, and much faster on a machine shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
