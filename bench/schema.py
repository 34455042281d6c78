"""The one layout of every results file, and how to read its cells; torch-free, like bench.report.

`python -m bench.quick` writes quick.json and `pytest bench --benchmark-only` writes bench.json,
both in this layout:

    schema       SCHEMA, the version of this layout
    command      the command that made the file
    smoke        true for bench.quick --smoke (tiny shapes: the numbers test the code only)
    environment  bench.core.environment(): device, driver, torch, triton, CUDA, cuDNN, CPU and its
                 flags, date, ...
    budget_s     bench.quick's --budget (null for the suites); started, finished (null until the
                 run ends), elapsed_s
    tests        bench.quick: what `pytest -m cuda -x -q` found (status, counts, the first
                 failure's one-line reason), or why it did not run; null for the suites
    sections     {name: {"status": ..., "cells": [cell, ...]}}, names from SECTIONS
    targets      bench.targets.evaluate(): {"target", "measured", "verdict"} per target

A cell is one measurement: its key (the fields that say what was measured: backend, pass,
dtype, shape, ...), "status" ("ok", "skipped: why", "failed: error", "stopped: why"), "result"
(the measured numbers, when ok), "cell_s" (how long it took) and, when it failed, "traceback".
"""

SCHEMA = 1
SECTIONS = {
    "parity": "triton and sdpa against float64 on the same inputs",
    "kernel_table": "causal attention, every backend, fwd and fwd + bwd: median ms and TFLOP/s",
    "host_time": "host time to issue a call, device time and wall time per call, at a model's training shape",
    "decode": "q_len 1 against a KV cache: device and wall time per call",
    "memory": "peak memory of one causal fwd + bwd beyond its inputs",
    "training": "tokens/s of gpt.train's step and of model.generate; wall time to a validation loss",
    "first_call": "the first call of each (backend, head dim, pass): compilation included",
}
NOT_KEY = ("status", "result", "cell_s", "traceback")


def new_results(command: str, environment: dict, smoke: bool = False, budget_s: float | None = None) -> dict:
    return {
        "schema": SCHEMA,
        "command": command,
        "smoke": smoke,
        "environment": environment,
        "budget_s": budget_s,
        "started": environment.get("date"),
        "finished": None,
        "elapsed_s": None,
        "tests": None,
        "sections": {name: {"status": "not started", "cells": []} for name in SECTIONS},
        "targets": [],
    }


def key_of(cell: dict) -> dict:
    """What a cell measured, without what it found."""
    return {k: v for k, v in cell.items() if k not in NOT_KEY}


def cells(results: dict, section: str, **match) -> list[dict]:
    """The cells of `section` whose fields equal `match`."""
    found = results["sections"].get(section, {}).get("cells", [])
    return [c for c in found if all(c.get(k) == v for k, v in match.items())]


def number(cell: dict | None, field: str):
    """A measured number of the cell, or None when there is no cell or it did not run."""
    if cell is None or cell.get("status") != "ok":
        return None
    return cell["result"].get(field)


def peer(results: dict, section: str, cell: dict, backend: str) -> dict | None:
    """The cell of `section` with the same key as `cell` but another backend."""
    key = dict(key_of(cell), backend=backend)
    return next((c for c in cells(results, section, **key) if key_of(c) == key), None)
