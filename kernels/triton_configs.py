"""Which launch config (block sizes, warps, pipeline stages) each attention kernel uses.

A launch config is looked up in TABLE, committed below, so that the first call at a new
shape only compiles: nothing is benchmarked unless you ask for it. The table is keyed by

    arch          "sm90" (H100, H200), "sm80" (A100), "generic" (any other CUDA GPU)
    kernel        "fwd", "dkdv", "dq" (kernels/triton_attention.py), "decode" (kernels/triton_decode.py)
    dtype class   "16-bit" (float16 and bfloat16: same size, same tensor-core path) or "float32"
    causal        True / False
    length class  of q_len: "decode" (<= 16), "short" (<= 1k), "medium" (<= 4k), "long"
    head dim      16 .. 256 (other multiples of 8 take the row of the next power of two, to which
                  the kernels pad their tiles)

Rows whose causal or length class is ANY apply to every value; a more specific row wins.
Decoding (q_len 1 to 16 against any kv_len) is one class, so a growing KV cache never
changes the config (and the kernels do not specialize on lengths, so it never recompiles).

The rows are INITIAL AND UNMEASURED: nobody has timed them on a GPU yet. The sm90 rows are
seeded from Triton's fused-attention tutorial (its Hopper forward configs: BLOCK_M 128,
BLOCK_N 64, 4 warps, since 8 warps only pay off at 128x128 tiles; its backward configs:
32x128 for dK/dV and 128x32 for dQ) and from the first choices of the autotune lists
this table replaced, then changed where `python -m kernels.compile_check` found them
spilling registers (sm80 and "generic" too, compiled for sm_80 and sm_86); "generic" also
shrinks them to 99 KiB of shared memory,
float32 rows are small enough for every GPU. Measured winners replace them.

GPT_KERNELS_AUTOTUNE=1 (kernels/triton_runtime.py) benchmarks `candidates(...)` once per
config class instead, with triton.testing.do_bench, and keeps the winner in a JSON file
(TunedConfigs) under $XDG_CACHE_HOME/gpt-kernels/, one per GPU name and Triton version,
so the next process reuses it. `python -m kernels.compile_check` compiles every table row
for its GPU ahead of time and reports registers, spills and shared memory.
"""

import json
import os
import re
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

KERNELS = ("fwd", "dkdv", "dq", "decode")
# What GPT_KERNELS_AUTOTUNE=1 tunes, and the block sizes (BLOCK_M, BLOCK_N) it tries for each;
# decode always uses the table (one config for every cache length, so decoding never tunes).
CANDIDATE_BLOCKS = {
    "fwd": ((128, 64), (64, 128, 32)),
    "dkdv": ((32, 64), (128, 64)),
    "dq": ((128, 64), (32, 64)),
}
TUNED_KERNELS = tuple(CANDIDATE_BLOCKS)
ARCHS = ("sm90", "sm80", "generic")
DTYPE_CLASSES = {torch.float32: "float32", torch.float16: "16-bit", torch.bfloat16: "16-bit"}
ELEMENT_SIZE = {"16-bit": 2, "float32": 4}
HEAD_DIMS = (16, 32, 64, 128, 256)
LENGTH_CLASSES = (("decode", 16), ("short", 1024), ("medium", 4096), ("long", None))  # (name, longest q_len)
# Shared memory one block may use (the opt-in limit): H100/H200 227 KiB, A100 163 KiB, and
# 99 KiB for the rest (RTX 30xx/40xx, L4, L40), the safe fallback.
SHARED_MEMORY = {"sm90": 227 * 1024, "sm80": 163 * 1024, "generic": 99 * 1024}
ANY = None


class LaunchConfig(NamedTuple):
    """How one kernel launches: its tiles, warps and pipeline depth, and which variant of it runs.

    The variant fields select variants of the same kernel source (constexpr switches), all off by
    default, so LaunchConfig(block_m, block_n, num_warps, num_stages) is today's kernel.
    VARIANT_KERNELS says which kernels have each; any other kernel refuses a config that sets it
    (unsupported_variants):
      tma              fwd: load Q, K, V and store O through tensor descriptors (TMA, sm_90 and
                       later) instead of pointers, for 16-bit inputs a descriptor can read (the
                       others, and packed sequences, run the pointer path)
      persistent       fwd: one program per SM, each looping over (query block, batch x head)
                       tiles, causal ones heaviest first
      warp_specialize  the key loops split into producer and consumer warps by Triton: no kernel
                       has it (UNAVAILABLE_VARIANTS says why)
      dq_atomic        dkdv: the single-pass backward. Each dK/dV program also adds its tiles'
                       share of dQ into a float32 buffer with atomic adds (5 matrix products per
                       tile pair, not 7), and the dq launch is skipped; dQ's summation order, and
                       so its last bits, then vary run to run
    """

    block_m: int  # query rows per tile
    block_n: int  # key rows per tile
    num_warps: int
    num_stages: int  # software-pipelining depth of the streamed loads
    tma: bool = False
    persistent: bool = False
    warp_specialize: bool = False
    dq_atomic: bool = False

    @property
    def variants(self) -> tuple[str, ...]:
        """The names of the variant fields that are on, e.g. ("tma", "persistent")."""
        return tuple(name for name in VARIANT_KERNELS if getattr(self, name))

    def label(self) -> str:
        """(block_m, block_n, num_warps, num_stages), then each variant that is on: "(32, 64, 8, 2)+dq_atomic"."""
        return str(tuple(self[:4])) + "".join(f"+{name}" for name in self.variants)


# The kernels that implement each variant field of LaunchConfig (in the fields' order).
VARIANT_KERNELS = {"tma": ("fwd",), "persistent": ("fwd",), "warp_specialize": (), "dq_atomic": ("dkdv",)}
assert tuple(VARIANT_KERNELS) == LaunchConfig._fields[4:]
# Variant fields no kernel implements, and why: the launch code refuses them with this reason.
UNAVAILABLE_VARIANTS = {
    "warp_specialize": "Triton's warp-specialization pass cannot compile the forward's key loops for sm_90 "
    "(Triton 3.9, 4 warps: an assertion aborts the process with pointer loads, a verifier error with tensor "
    "descriptors; 8 warps: the loops are left unspecialized)",
}


def unsupported_variants(kernel: str, cfg: LaunchConfig) -> list[str]:
    """Why `kernel` cannot launch with `cfg`'s variant fields (one line each); empty if it can."""
    found = []
    for name in cfg.variants:
        if name in UNAVAILABLE_VARIANTS:
            found.append(f"LaunchConfig.{name} is not available: {UNAVAILABLE_VARIANTS[name]}; set it False")
        elif kernel not in VARIANT_KERNELS[name]:
            kernels = "/".join(VARIANT_KERNELS[name])
            found.append(f"LaunchConfig.{name}=True is a {kernels} variant; the {kernel} kernel has none")
    return found


# The 16-bit sm90 forward's own candidates per head dim, tried first (FlashAttention-3's and
# tritonbench's Hopper tiles: 128 x 128 on 8 warps at head dim 128; BLOCK_M 128 or 256 at 64).
# Compiled for sm_90 as a launch specializes them (kernels.compile_check's rules, causal and not),
# none spills and all fit: d128 (128, 128, 8, 2) 255 registers, 160 KiB; d64 (128, 128, 8, 2)
# and (128, 128, 8, 3) up to 222 registers, 80 and 112 KiB; (256, 64, 8, 3) 236, 80 KiB.
HOPPER_FORWARD_CANDIDATES = {
    64: (LaunchConfig(128, 128, 8, 2), LaunchConfig(128, 128, 8, 3), LaunchConfig(256, 64, 8, 3)),
    128: (LaunchConfig(128, 128, 8, 2),),
}
# Never tried, because they spill there (compiled the same way): d128 (128, 128, 8, 3) 12 bytes per
# thread, d64 (256, 128, 8, 2 or 3) 4 bytes.
HOPPER_FORWARD_SPILLS = {
    64: (LaunchConfig(256, 128, 8, 2), LaunchConfig(256, 128, 8, 3)),
    128: (LaunchConfig(128, 128, 8, 3),),
}


# Under Triton's CPU interpreter: small fixed configs, so tests stay fast. Query and key
# blocks differ on purpose, so both orders of BLOCK_M vs BLOCK_N get exercised.
INTERPRETER_CONFIGS = {
    "fwd": LaunchConfig(32, 16, 4, 1),
    "dkdv": LaunchConfig(16, 32, 4, 1),
    "dq": LaunchConfig(16, 32, 4, 1),
    "decode": LaunchConfig(16, 16, 4, 1),  # small key blocks: short test caches span several splits
}


def _rows(**by_head_dim) -> dict[int, LaunchConfig]:
    """{head_dim: LaunchConfig} from keywords like d64=(128, 64, 4, 3)."""
    return {int(name[1:]): LaunchConfig(*cfg) for name, cfg in by_head_dim.items()}


# (kernel, dtype class, causal, length class) -> {head_dim: (BLOCK_M, BLOCK_N, num_warps, num_stages)}
# Where the tutorial's config spilled registers in `kernels.compile_check` (head dims 64 and up),
# the row takes 8 warps or smaller tiles instead. Compiled as a launch specializes them (head-dim
# stride 1: pipelined loads), no 16-bit row of sm90, sm80 or generic spills, all fit, and every
# sm90 one has wgmma (dK/dV at head dim 256, 32-key tiles: mma.sync) and cp.async; the forward at
# head dim 128 on 4 warps instead of 8 spills 412 bytes.
_HOPPER = {
    ("fwd", "16-bit", ANY, ANY): _rows(
        d16=(128, 64, 4, 3), d32=(128, 64, 4, 3), d64=(128, 64, 4, 3), d128=(128, 64, 8, 3), d256=(64, 32, 8, 2)
    ),
    ("dkdv", "16-bit", ANY, ANY): _rows(
        d16=(32, 128, 4, 5), d32=(32, 128, 4, 5), d64=(32, 128, 8, 3), d128=(32, 64, 8, 2), d256=(32, 32, 8, 2)
    ),
    ("dq", "16-bit", ANY, ANY): _rows(
        d16=(128, 32, 4, 5), d32=(128, 32, 4, 5), d64=(128, 32, 8, 3), d128=(64, 64, 4, 3), d256=(64, 32, 8, 2)
    ),
}
_AMPERE = {  # the Hopper rows, except where they spill registers on sm_80 (no wgmma there)
    ("fwd", "16-bit", ANY, ANY): _rows(
        d16=(128, 64, 4, 3), d32=(128, 64, 8, 3), d64=(128, 64, 4, 3), d128=(64, 64, 4, 3), d256=(64, 32, 8, 2)
    ),
    ("dkdv", "16-bit", ANY, ANY): _HOPPER[("dkdv", "16-bit", ANY, ANY)],
    ("dq", "16-bit", ANY, ANY): _rows(
        d16=(128, 32, 4, 5), d32=(128, 32, 4, 5), d64=(128, 32, 8, 3), d128=(64, 32, 8, 2), d256=(64, 32, 8, 2)
    ),
}
_GENERIC = {  # the Ampere rows cut down to 99 KiB of shared memory
    ("fwd", "16-bit", ANY, ANY): _rows(
        d16=(128, 64, 4, 3), d32=(128, 64, 4, 3), d64=(128, 64, 4, 3), d128=(128, 64, 8, 2), d256=(64, 32, 8, 2)
    ),
    ("dkdv", "16-bit", ANY, ANY): _rows(
        d16=(32, 128, 4, 3), d32=(32, 128, 4, 3), d64=(32, 128, 8, 3), d128=(32, 64, 8, 2), d256=(32, 32, 8, 2)
    ),
    ("dq", "16-bit", ANY, ANY): _rows(
        d16=(128, 32, 4, 3), d32=(128, 32, 4, 3), d64=(128, 32, 8, 3), d128=(64, 32, 8, 2), d256=(32, 32, 8, 2)
    ),
}
_EVERY_GPU = {
    # The split-KV decode kernel: all q_len <= 16 query rows in one 16-row tile; it streams K
    # and V once (memory bound), so key blocks as wide as keep the pipeline in shared memory.
    # Head dims 128 and 256 on 4 warps spilled hundreds of bytes (kernels.compile_check): 8 warps.
    # Head dim 16 pipelines 2 stages deep: with 3, sm_90's compile spills 12 bytes (not causal).
    ("decode", "16-bit", ANY, ANY): _rows(
        d16=(16, 64, 4, 2), d32=(16, 64, 4, 3), d64=(16, 64, 4, 3), d128=(16, 64, 8, 2), d256=(16, 32, 8, 2)
    ),
    ("decode", "float32", ANY, ANY): _rows(
        d16=(16, 64, 4, 3), d32=(16, 64, 4, 3), d64=(16, 32, 4, 3), d128=(16, 32, 8, 2), d256=(16, 16, 4, 2)
    ),
    # Decoding: a 128-row query tile would be almost all padding for q_len 1, so 16 rows
    # (the smallest a tl.dot takes) and wider key tiles.
    ("fwd", "16-bit", ANY, "decode"): _rows(
        d16=(16, 64, 4, 2), d32=(16, 64, 4, 2), d64=(16, 64, 4, 2), d128=(16, 64, 4, 2), d256=(16, 32, 8, 2)
    ),
    ("fwd", "float32", ANY, "decode"): _rows(
        d16=(16, 32, 4, 2), d32=(16, 32, 4, 2), d64=(16, 64, 4, 2), d128=(16, 16, 4, 3), d256=(16, 16, 4, 2)
    ),
    # float32 multiplies at full IEEE precision, without tensor cores: its tiles live in
    # registers, so they are small (larger ones spill heavily), and fit 99 KiB everywhere.
    # Compiled as a launch specializes them, these spilled 4 to 32 bytes (sm_90 unless said) and
    # changed: forward d32 3 -> 2 stages, d64 4 -> 8 warps, d128 2 -> 3 stages (decoding's row
    # too); dK/dV d16 4 -> 8 warps, d32 (32, 64, 8, 2) -> (16, 64, 4, 3), d64 and d128 2 -> 3
    # stages; dQ d16 (sm_80) and d64 (sm_86) 2 -> 3 stages.
    ("fwd", "float32", ANY, ANY): _rows(
        d16=(64, 32, 4, 3), d32=(64, 32, 4, 2), d64=(32, 32, 8, 2), d128=(16, 16, 4, 3), d256=(16, 16, 4, 2)
    ),
    ("dkdv", "float32", ANY, ANY): _rows(
        d16=(32, 64, 8, 3), d32=(16, 64, 4, 3), d64=(16, 32, 4, 3), d128=(16, 16, 4, 3), d256=(16, 16, 8, 2)
    ),
    ("dq", "float32", ANY, ANY): _rows(
        d16=(64, 32, 8, 3), d32=(64, 32, 8, 2), d64=(64, 32, 8, 3), d128=(16, 16, 4, 2), d256=(16, 16, 4, 2)
    ),
}
TABLE = {
    "sm90": {**_HOPPER, **_EVERY_GPU},
    "sm80": {**_AMPERE, **_EVERY_GPU},
    "generic": {**_GENERIC, **_EVERY_GPU},
}


# The single-pass backward (kernels.attention(..., deterministic=False)) launches the dK/dV
# pass with the config the table (or the tuner) gives it and dq_atomic on, except where that
# spills registers (`kernels.compile_check --hopper-variants`, sm_90): those configs take the
# one here instead, found the same way. Unmeasured, like the table.
SINGLE_PASS = {
    # 16-bit head dim 256: 28 bytes spilled (causal); half the query rows per step
    LaunchConfig(32, 32, 8, 2): LaunchConfig(16, 32, 8, 2, dq_atomic=True),
    # float32 head dim 64: 28 bytes spilled (not causal); 8 warps
    LaunchConfig(16, 32, 4, 3): LaunchConfig(16, 32, 8, 3, dq_atomic=True),
}


def single_pass(dkdv: LaunchConfig) -> LaunchConfig:
    """The single-pass backward's config in place of the dK/dV config `dkdv`: SINGLE_PASS's, or
    dkdv with dq_atomic on."""
    return SINGLE_PASS.get(dkdv, dkdv._replace(dq_atomic=True))


def with_variant(name: str, cfg: LaunchConfig) -> LaunchConfig:
    """The config of a row whose config is `cfg` with variant field `name` on (dq_atomic: single_pass)."""
    return single_pass(cfg) if name == "dq_atomic" else cfg._replace(**{name: True})


def arch_of(capability: tuple[int, int]) -> str:
    """The TABLE architecture for a CUDA compute capability, e.g. (9, 0) -> "sm90"."""
    return {(9, 0): "sm90", (8, 0): "sm80"}.get(tuple(capability), "generic")


def length_class(q_len: int) -> str:
    for name, longest in LENGTH_CLASSES:
        if longest is None or q_len <= longest:
            return name
    raise AssertionError("the last length class has no bound")


def table_config(arch: str, kernel: str, dtype_class: str, causal: bool, length: str, head_dim: int) -> LaunchConfig:
    """The committed config for one key: the most specific matching row of TABLE[arch]."""
    rows = TABLE[arch]
    for c, n in ((causal, length), (causal, ANY), (ANY, length), (ANY, ANY)):
        row = rows.get((kernel, dtype_class, c, n))
        if row is not None and head_dim in row:
            return row[head_dim]
    raise KeyError(f"no {arch} launch config for {kernel} {dtype_class} head_dim {head_dim}")


# ---------------------------------------------------------------------------------------
# What a config needs, and whether that fits
# ---------------------------------------------------------------------------------------

# Per kernel, in HEAD_DIM-wide rows as functions of (BLOCK_M, BLOCK_N):
#   resident  tiles loaded once and held for the whole program (staged in shared memory)
#   streamed  tiles loaded per loop step, buffered num_stages deep in shared memory
#   accumulators  float32 accumulator rows held in registers
_FOOTPRINT = {
    "fwd": (lambda m, n: m, lambda m, n: 2 * n, lambda m, n: m),  # q; k, v; acc
    "dkdv": (lambda m, n: 2 * n, lambda m, n: 2 * m, lambda m, n: 2 * n),  # k, v; q, dO; dk, dv
    "dq": (lambda m, n: 2 * m, lambda m, n: 2 * n, lambda m, n: m),  # q, dO; k, v; dq
    "decode": (lambda m, n: m, lambda m, n: 2 * n, lambda m, n: m),  # as fwd: q; k, v; acc
}


def shared_memory(kernel: str, cfg: LaunchConfig, head_dim: int, dtype_class: str) -> int:
    """Estimated shared memory in bytes: resident tiles plus num_stages buffers of the streamed ones."""
    resident, streamed, _ = _FOOTPRINT[kernel]
    rows = resident(cfg.block_m, cfg.block_n) + streamed(cfg.block_m, cfg.block_n) * cfg.num_stages
    return ELEMENT_SIZE[dtype_class] * head_dim * rows


def problems(kernel: str, cfg: LaunchConfig, head_dim: int, dtype_class: str, arch: str) -> list[str]:
    """Why `cfg` cannot (or should not) run on `arch`; empty if it is fine.

    Legal: power-of-two blocks of at least 16 (tl.dot's smallest operand), 1-8 warps.
    Fits: estimated shared memory within the arch's limit, and per thread at most 128
    accumulator and 64 score registers (more spills; rough, `kernels.compile_check` measures).
    """
    found = unsupported_variants(kernel, cfg)
    for name, size in (("BLOCK_M", cfg.block_m), ("BLOCK_N", cfg.block_n)):
        if size < 16 or size & (size - 1):
            found.append(f"{name}={size} is not a power of two >= 16")
    if cfg.num_warps not in (1, 2, 4, 8) or cfg.num_stages < 1:
        found.append(f"num_warps={cfg.num_warps}, num_stages={cfg.num_stages}")
    smem, limit = shared_memory(kernel, cfg, head_dim, dtype_class), SHARED_MEMORY[arch]
    if smem > limit:
        found.append(f"needs ~{smem // 1024} KiB shared memory, {arch} has {limit // 1024} KiB")
    threads = 32 * cfg.num_warps
    accumulators = _FOOTPRINT[kernel][2](cfg.block_m, cfg.block_n) * head_dim // threads
    scores = cfg.block_m * cfg.block_n // threads
    if accumulators > 128 or scores > 64:
        found.append(f"{accumulators} accumulator + {scores} score registers per thread would spill")
    return found


def candidates(
    arch: str, kernel: str, dtype_class: str, causal: bool, length: str, head_dim: int
) -> list[LaunchConfig]:
    """What GPT_KERNELS_AUTOTUNE=1 benchmarks: the table's config first, then every fitting variant."""
    block_ms, block_ns = CANDIDATE_BLOCKS[kernel]  # KeyError for a kernel that is never tuned
    variants = [LaunchConfig(m, n, w, s) for m in block_ms for n in block_ns for w in (4, 8) for s in (2, 3, 4)]
    if arch == "sm90":  # the tutorial's rule: on Hopper 8 warps only pay off on 128x128 tiles and up
        variants = [c for c in variants if c.num_warps == 4 or c.block_m * c.block_n >= 128 * 128]
        if kernel == "fwd" and dtype_class == "16-bit":
            variants = list(dict.fromkeys([*HOPPER_FORWARD_CANDIDATES.get(head_dim, ()), *variants]))
            variants = [c for c in variants if c not in HOPPER_FORWARD_SPILLS.get(head_dim, ())]
    if kernel == "fwd" and causal:  # a query block narrower than its key blocks masks most of each diagonal one
        variants = [c for c in variants if c.block_m >= c.block_n]
    first = table_config(arch, kernel, dtype_class, causal, length, head_dim)
    fitting = [c for c in variants if c != first and not problems(kernel, c, head_dim, dtype_class, arch)]
    return [first, *fitting]


# ---------------------------------------------------------------------------------------
# Opt-in autotuning, remembered on disk
# ---------------------------------------------------------------------------------------


def tune(configs: list[LaunchConfig], run) -> LaunchConfig:
    """The fastest of `configs`, timing run(config) with triton.testing.do_bench.

    The one place that benchmarks: tests replace it to count how often tuning happens.
    """
    if len(configs) == 1:
        return configs[0]
    import triton.testing  # only needed here, on a GPU

    times = [triton.testing.do_bench(lambda cfg=cfg: run(cfg)) for cfg in configs]
    return configs[times.index(min(times))]


def tuning_file(directory: Path, device_name: str, triton_version: str) -> Path:
    """Where tuned winners for one GPU model and Triton version live, e.g. NVIDIA-H100-80GB-HBM3-triton3.6.0.json."""
    return Path(directory) / f"{re.sub(r'[^A-Za-z0-9.]+', '-', device_name)}-triton{triton_version}.json"


def _to_json(cfg: LaunchConfig) -> list:
    """[block_m, block_n, num_warps, num_stages] and the names of the variant fields that are on:
    the same file, whatever order LaunchConfig declares its variant fields in."""
    return [*cfg[:4], *cfg.variants]


def _from_json(stored: list) -> LaunchConfig:
    sizes, variants = stored[:4], stored[4:]
    return LaunchConfig(*sizes, **dict.fromkeys(variants, True))


class TunedConfigs:
    """Autotuned winners per config key, kept in memory and in a JSON file between processes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._winners = self._read()

    def winner(self, key: str, configs: list[LaunchConfig], run) -> LaunchConfig:
        """The remembered winner for `key`, or tune(configs, run) once and remember it."""
        if key not in self._winners:
            self._winners[key] = tune(configs, run)
            self._write()
        return self._winners[key]

    def _read(self) -> dict[str, LaunchConfig]:
        try:
            stored = json.loads(self.path.read_text())
            return {key: _from_json(cfg) for key, cfg in stored.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError) as err:  # unreadable or from another version: tune again
            warnings.warn(f"kernels: ignoring tuned configs in {self.path} ({err})", stacklevel=2)
            return {}

    def _write(self) -> None:
        # Merge what other processes wrote meanwhile, then replace the file atomically, so a
        # reader never sees half a file.
        winners = {**self._read(), **self._winners}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps({key: _to_json(cfg) for key, cfg in sorted(winners.items())}, indent=1))
        os.replace(temporary, self.path)
