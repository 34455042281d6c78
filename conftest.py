"""Repository-wide pytest wiring.

Being at the repository root, this file also puts the root on sys.path, so that `bench` (not an
installed package) imports in every test and benchmark run from here.

A test marked `cuda` (pytest.ini) needs a CUDA GPU: without one it is skipped, with that reason.
`pytest -m cuda` runs only those tests (bench.quick does, first, on a GPU).
"""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked cuda: `pytest -m cuda` runs these on a GPU)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
