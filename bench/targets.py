"""The project's targets, as data: the one table every report reads (torch-free).

Each Target names the cells it covers (a section of a results file, the backend, fields that
must match) and the number it bounds. That number is our kernel's own (peer None), or its ratio
to a peer's number in the cell with the same key from the same run: ours / peer, so a bound of
">= 1.0" on "tflops" against sdpa-cudnn reads "at least as fast as cuDNN", and "<= 1.5" on
"host_us" against sdpa reads "at most 1.5 times sdpa's host time".

evaluate(results) gives every target one verdict:

    met            every cell it covers was measured and meets the bound
    not met        a measured cell misses it (one is enough)
    not measured   a cell it covers did not run, or none was recorded
    n/a on cpu     a GPU target (H100/H200, bf16), and the run was not on a GPU
"""

from dataclasses import dataclass, field

from bench import schema


@dataclass(frozen=True)
class Target:
    text: str  # what the report shows
    section: str
    field: str  # a key of the cells' "result"
    op: str  # ">=" or "<="
    bound: float
    peer: str | None = None  # None: our number itself; else our number over this backend's
    where: dict = field(default_factory=dict)  # cell field -> a value, or a tuple of allowed values
    between: dict = field(default_factory=dict)  # cell field -> (lowest, highest), inclusive
    total_over: str | None = None  # sum the cells that differ only in this field
    backend: str = "triton"
    gpu_only: bool = True

    def covers(self, cell: dict) -> bool:
        if cell.get("backend") != self.backend:
            return False
        for name, allowed in self.where.items():
            if cell.get(name) not in (allowed if isinstance(allowed, tuple) else (allowed,)):
                return False
        return all(cell.get(name) is not None and lo <= cell[name] <= hi for name, (lo, hi) in self.between.items())

    def values(self, results: dict) -> list:
        """One number per covered cell (or group of cells), None where it was not measured."""
        covered = [c for c in schema.cells(results, self.section) if self.covers(c)]
        values = []
        for cell in covered:
            ours = schema.number(cell, self.field)
            if self.peer is not None:
                theirs = schema.number(schema.peer(results, self.section, cell, self.peer), self.field)
                ours = ours / theirs if ours is not None and theirs else None
            values.append((cell, ours))
        if self.total_over is None:
            return [v for _, v in values]
        groups = {}
        for cell, value in values:
            key = tuple(sorted((k, v) for k, v in schema.key_of(cell).items() if k != self.total_over))
            groups.setdefault(key, []).append(value)
        return [None if None in group else sum(group) for group in groups.values()]

    def check(self, value) -> bool | None:
        if value is None:
            return None
        return value >= self.bound if self.op == ">=" else value <= self.bound


# The project's tolerance rule (tests/tolerances.py): a backend's max error against float64 is at
# most ERROR_RATIO times the same-precision baseline's, plus a floor per dtype.
ERROR_RATIO = 2.0
ABS_FLOOR = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 1e-2}

KERNEL = {"dtype": "bfloat16", "head_dim": (64, 128)}
T_1K_16K, T_4K_16K = {"seqlen": (1024, 16384)}, {"seqlen": (4096, 16384)}

TARGETS = (
    Target(
        "parity: triton's max error against float64 <= 2x sdpa's at the same precision + the dtype's floor",
        "parity",
        "tolerance_used",
        "<=",
        1.0,
        gpu_only=False,
    ),
    *(
        Target(
            f"{label}, bf16 causal, D 64/128, T {span}: triton >= {bound}x cuDNN",
            "kernel_table",
            "tflops",
            ">=",
            bound,
            peer="sdpa-cudnn",
            where={**KERNEL, "pass": mode},
            between=between,
        )
        for bound, span, between in ((1.0, "1k-16k", T_1K_16K), (1.1, "4k-16k", T_4K_16K))
        for mode, label in (("fwd", "fwd"), ("fwd_bwd", "fwd+bwd"))
    ),
    Target(
        "fwd, bf16 causal, D 128, T 16k: triton >= 600 TFLOP/s",
        "kernel_table",
        "tflops",
        ">=",
        600.0,
        where={"dtype": "bfloat16", "pass": "fwd", "head_dim": 128, "seqlen": 16384},
    ),
    *(
        Target(
            f"host time per {label} call at the training shape <= 1.5x sdpa's",
            "host_time",
            "host_us",
            "<=",
            1.5,
            peer="sdpa",
            where={"pass": mode},
        )
        for mode, label in (("fwd", "fwd"), ("fwd_bwd", "fwd+bwd"))
    ),
    Target(
        "first call at a new head dim (fwd, fwd+bwd and decode, compilation included) <= 10 s",
        "first_call",
        "seconds",
        "<=",
        10.0,
        total_over="pass",
    ),
    *(
        Target(
            f"decode, kv 64-8k: triton's {what} per call <= sdpa's",
            "decode",
            name,
            "<=",
            1.0,
            peer="sdpa",
            between={"kv_len": (64, 8192)},
        )
        for name, what in (("ms", "device time"), ("wall_us", "wall time"))
    ),
    Target(
        "training tokens/s (gpt.train's step): triton >= 1.05x sdpa",
        "training",
        "tokens_per_s",
        ">=",
        1.05,
        peer="sdpa",
        where={"what": "train"},
    ),
    Target(
        "sampling tokens/s (model.generate, as gpt.sample runs it): triton >= 1.0x sdpa",
        "training",
        "tokens_per_s",
        ">=",
        1.0,
        peer="sdpa",
        where={"what": "sample"},
    ),
)


UNITS = {"tflops": "TFLOP/s", "seconds": "s", "tolerance_used": "of the tolerance"}


def verdict(checks: list) -> str:
    measured = sum(c is not None for c in checks)
    partly = f" ({measured} of {len(checks)} cells measured)" if measured < len(checks) else ""
    if False in checks:
        return "not met" + partly
    return "met" if checks and not partly else "not measured" + partly


def measured_text(target: Target, values: list) -> str:
    found = [v for v in values if v is not None]
    if not found:
        return "-"
    low, high = f"{min(found):.3g}", f"{max(found):.3g}"
    span = low if low == high else f"{low} to {high}"
    return f"{span}x {target.peer}" if target.peer else f"{span} {UNITS.get(target.field, target.field)}"


def evaluate(results: dict, targets=TARGETS) -> list[dict]:
    device = results["environment"].get("device")
    rows = []
    for target in targets:
        values = target.values(results)
        result = verdict([target.check(v) for v in values])
        if target.gpu_only and device != "cuda":
            result = f"n/a on {device}"
        rows.append({"target": target.text, "measured": measured_text(target, values), "verdict": result})
    return rows
