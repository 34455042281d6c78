"""Compile every launch config of the table as a real launch specializes it, for GPUs this machine need not have.

    TRITON_INTERPRET=0 python -m kernels.compile_check              # the sm90 rows, for sm_90a
    TRITON_INTERPRET=0 python -m kernels.compile_check --arch all   # also sm80 (sm_80) and generic (sm_86)
    TRITON_INTERPRET=0 python -m kernels.compile_check --variants   # also every row with every feature on
    TRITON_INTERPRET=0 python -m kernels.compile_check --hopper-variants  # also each sm90 row's config variants

What it compiles. At launch, Triton's JIT specializes a kernel on its arguments: an integer
argument equal to 1 becomes a constant (the head-dim stride of a contiguous or fused-QKV
tensor is 1, and with it the loads vectorize and pipeline into asynchronous copies), and
pointers and integers divisible by 16 are marked so. A signature written by hand compiles
another program, with other registers and shared memory. So nothing here declares a
signature: the launch code itself (kernels/triton_attention.py, kernels/triton_decode.py)
runs with a row's config on meta tensors shaped like the model's calls (`inputs`), each
of its launches goes through Triton's own JITFunction.run with a stand-in driver that
names the target GPU, and knobs.runtime.jit_cache_hook records the specialization the JIT
would compile (signature, constants, attributes, options) and stops the launch there.
Each distinct specialization is then compiled once with JITFunction.preload, Triton's way
of compiling a recorded specialization ahead of time. Lengths are not specialized on
(do_not_specialize), so the calls of a row mostly share one program.

With --variants each row also compiles its fused-QKV calls with every feature of
kernels.attention switched on (VARIANT: grouped-query heads, a window, a softcap, dropout),
the heaviest variant of the kernels, shown as "variant" in the calls column; the same
checks apply. The features are constexpr switches, so the plain calls compile the kernels
exactly as they were before the features existed.

With --hopper-variants each sm90 row is compiled again with each of its kernel's config variants
(variant_configs, from the variant fields of LaunchConfig in kernels/triton_configs.py: the
forward's tma, persistent and both together, on 16-bit rows beyond decoding's lengths; dkdv's
dq_atomic, the single-pass backward, in the config triton_configs.single_pass gives it): the rows
a GPU measurement times. They are rows of their own ("(128, 64, 8, 3)+tma"), serving the same
calls as the table row, whose other kernels launch without the field; with --variants too, also
its calls with every feature on. Their NEEDS lines say what each must contain (a TMA variant:
cp.async.bulk.tensor; dq_atomic: float32 atomic adds), so a variant that fell back to a slower
path fails here. The variants no kernel implements (UNAVAILABLE_VARIANTS) are listed, not compiled.

What it checks, for every row and every program its calls compile to:
  - registers and spilled bytes per thread (the `ptxas -v` log of Triton's own cubin) and
    shared memory (the compiled kernel's metadata);
  - the instructions the row should have (NEEDS): wgmma on sm_90 and mma.sync elsewhere
    for 16-bit tensor-core tiles, asynchronous copies (cp.async) when num_stages > 1, TMA
    (cp.async.bulk.tensor) where a variant uses tensor descriptors, float32 atomic adds
    (red/atom.global...add.f32) where dq_atomic adds dQ with them.
It exits 1 with one line per failing row when a row spills more than SPILL_LIMIT, needs
more shared memory than its architecture has (SHARED_MEMORY), lacks an instruction NEEDS
asks for, or does not compile. Variants (--variants' calls, --hopper-variants' rows) are held
to all of it but the spill limit: they are what a GPU run times against the table, not what
the table runs, so their spills are printed for that run to weigh ("ok (a variant: spills
reported, not failed)").

A new kernel adds a KERNELS line (which launch code runs it); a new variant of one adds a
NEEDS line (what its code must contain). Arguments and constexprs the kernels gain need
nothing here: they come from the launch code.

No GPU is needed: Triton ships ptxas. Works with Triton 3.6 and 3.9 (the JIT internals it
uses are named in _require_triton_jit).
"""

import argparse
import contextlib
import dataclasses
import importlib
import io
import json
import os
import re
import sys
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from types import SimpleNamespace

if os.environ.get("TRITON_INTERPRET", "0") != "0":
    sys.exit("compile_check compiles for a real GPU: run it with TRITON_INTERPRET=0")
os.environ["TRITON_INTERPRET"] = "0"  # kernels.triton_runtime then leaves the kernels compilable

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from kernels import triton_attention, triton_decode  # noqa: E402
from kernels.triton_common import Options  # noqa: E402
from kernels.triton_configs import (  # noqa: E402
    ANY,
    ARCHS,
    LENGTH_CLASSES,
    SHARED_MEMORY,
    TABLE,
    UNAVAILABLE_VARIANTS,
    VARIANT_KERNELS,
    LaunchConfig,
    table_config,
    with_variant,
)
from kernels.triton_configs import KERNELS as TABLE_KERNELS  # noqa: E402

# The GPU each table architecture is compiled for (warp size 32, as CUDA drivers report it).
TARGETS = {"sm90": GPUTarget("cuda", 90, 32), "sm80": GPUTarget("cuda", 80, 32), "generic": GPUTarget("cuda", 86, 32)}
# Spilled bytes per thread a row may have: none. A spill moves registers to local memory
# inside the inner loop; every row compiles without one at some other warp count, tile or
# pipeline depth, so a row that spills takes that instead.
SPILL_LIMIT = {"16-bit": 0, "float32": 0}
# Triton 3.9 warns that 3.10 will change its default; the launches here get today's, as real ones do.
warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
DTYPES = {"16-bit": torch.bfloat16, "float32": torch.float32}  # the dtype each class is compiled with


# ---------------------------------------------------------------------------------------
# What the compiled code must contain
# ---------------------------------------------------------------------------------------

# Instructions looked for in the PTX, counted per program.
FEATURES = {
    "wgmma": r"\bwgmma\.mma_async\b",  # Hopper's warpgroup matrix multiply
    "mma": r"\bmma\.sync\.aligned\b",  # Ampere's warp matrix multiply
    "cp.async": r"\bcp\.async\.c[ag]\.shared\.global\b",  # asynchronous copies: pipelined pointer loads
    "tma": r"\bcp\.async\.bulk\.tensor\b",  # tensor-descriptor (TMA) loads
    # float32 atomic adds to global memory: red (result unused, e.g. red.global.gpu.relaxed.add.v4.f32) or atom
    "atomic": r"\b(?:red|atom)\.global(?:\.\w+)*\.add(?:\.\w+)*\.f32\b",
}


@dataclasses.dataclass(frozen=True)
class Needs:
    """Instructions the compiled code of some rows must contain: one line per kernel or variant.

    Applies to the rows of `archs`, `kernels` (None: all) and `dtype_classes` for which
    when(kernel, cfg) holds; they must contain at least one of `features` (FEATURES keys).
    `why` is printed when none is there.
    """

    features: tuple[str, ...]
    why: str
    archs: tuple[str, ...] = ARCHS
    kernels: tuple[str, ...] | None = None
    dtype_classes: tuple[str, ...] = ("16-bit",)
    when: Callable[[str, LaunchConfig], bool] = lambda kernel, cfg: True

    def applies(self, arch: str, kernel: str, dtype_class: str, cfg: LaunchConfig) -> bool:
        return (
            arch in self.archs
            and (self.kernels is None or kernel in self.kernels)
            and dtype_class in self.dtype_classes
            and self.when(kernel, cfg)
        )


def tile_rows(kernel: str, cfg: LaunchConfig) -> int:
    """Rows of the tile a program owns, the M of its matrix products (dK/dV's programs own keys)."""
    return cfg.block_n if kernel == "dkdv" else cfg.block_m


NEEDS = (
    # A warpgroup's wgmma multiplies 64 rows at a time: smaller tiles (decoding's 16) take mma.sync.
    Needs(("wgmma",), "16-bit tiles of 64 rows and more use Hopper's wgmma", archs=("sm90",),
          when=lambda kernel, cfg: tile_rows(kernel, cfg) >= 64),
    Needs(("mma",), "16-bit tiles under 64 rows use mma.sync", archs=("sm90",),
          when=lambda kernel, cfg: tile_rows(kernel, cfg) < 64),
    Needs(("mma",), "16-bit tiles use mma.sync", archs=("sm80", "generic")),
    Needs(("cp.async", "tma"), "num_stages > 1 pipelines the loads into asynchronous copies",
          dtype_classes=("16-bit", "float32"), when=lambda kernel, cfg: cfg.num_stages > 1),
    Needs(("tma",), "tma=True loads through tensor descriptors (TMA: cp.async.bulk.tensor)", archs=("sm90",),
          when=lambda kernel, cfg: cfg.tma),
    Needs(("atomic",), "dq_atomic adds dQ into float32 memory with atomic reductions", kernels=("dkdv",),
          dtype_classes=("16-bit", "float32"), when=lambda kernel, cfg: cfg.dq_atomic),
)  # fmt: skip

# --hopper-variants: the variants each kernel's sm90 rows are compiled with, as the variant fields
# of LaunchConfig turned on (every field a kernel has, VARIANT_KERNELS, and the forward's two together).
HOPPER_VARIANTS = {
    "fwd": (("tma",), ("persistent",), ("tma", "persistent")),
    "dkdv": (("dq_atomic",),),
}
assert {name for of in HOPPER_VARIANTS.values() for names in of for name in names} == {
    name for name, kernels in VARIANT_KERNELS.items() if kernels
}


def variant_configs(kernel: str, dtype_class: str, length: str | None, cfg: LaunchConfig) -> list[LaunchConfig]:
    """The configs --hopper-variants compiles a sm90 row of `kernel` with besides its own: its
    HOPPER_VARIANTS (dq_atomic in the config triton_configs.single_pass gives it). Forward rows
    only at 16 bits beyond decoding's lengths: float32 takes the pointer path under tma, and
    decoding goes to the decode kernel."""
    if kernel == "fwd" and (dtype_class != "16-bit" or length == "decode"):
        return []
    configs = []
    for names in HOPPER_VARIANTS.get(kernel, ()):
        variant = cfg
        for name in names:
            variant = with_variant(name, variant)
        configs.append(variant)
    return configs


# ---------------------------------------------------------------------------------------
# The calls: what the model passes, on meta tensors
# ---------------------------------------------------------------------------------------

BATCH, HEADS = 2, 4  # the model's default head count (neither 1 nor a multiple of 16: plain ints)
Q_LEN = {"decode": 1, "short": 1024, "medium": 4096, "long": 16384}  # one length per length class
DECODE_KV_LEN = 1024  # decoding: new queries against a cache of this many keys
LAYOUTS = ("fused QKV", "contiguous")
# --variants: each row's fused-QKV calls again with every feature of kernels.attention on, the
# heaviest variant of the kernels (the decode kernel does no dropout: training takes the forward).
VARIANT = ("gqa", "window", "softcap", "dropout")
VARIANT_OPTIONS = dict(window=256, softcap=30.0, dropout_p=0.1, dropout_seed=1)


@dataclasses.dataclass(frozen=True)
class Call:
    """One attention call the check launches: its memory layout, mask, length class and features."""

    layout: str  # "fused QKV": q, k, v are views of one (B, T, 3, H, D) projection; "contiguous": (B, H, T, D)
    causal: bool
    length: str
    features: tuple[str, ...] = ()  # of VARIANT: "gqa" gives k and v half as many heads as q


def inputs(call: Call, dtype: torch.dtype, head_dim: int) -> SimpleNamespace:
    """q, k, v (B, H, T, D) and the output gradient do, as meta tensors laid out as the model makes them."""
    q_len = Q_LEN[call.length]
    kv_len = DECODE_KV_LEN if call.length == "decode" else q_len

    def empty(*shape):
        return torch.empty(shape, dtype=dtype, device="meta")

    if call.layout == "fused QKV":
        # (B, T, 3, H, D) -> three (B, H, T, D) views, head-dim stride 1 (gpt/model.py)
        q, k, v = (t.transpose(1, 2) for t in empty(BATCH, q_len, 3, HEADS, head_dim).unbind(2))
        if call.length == "decode":  # the keys and values come from the cache (torch.cat: contiguous)
            k, v = empty(BATCH, HEADS, kv_len, head_dim), empty(BATCH, HEADS, kv_len, head_dim)
        do = empty(BATCH, q_len, HEADS, head_dim).transpose(1, 2)  # the gradient of y.transpose(1, 2)
    else:
        q, do = empty(BATCH, HEADS, q_len, head_dim), empty(BATCH, HEADS, q_len, head_dim)
        k, v = empty(BATCH, HEADS, kv_len, head_dim), empty(BATCH, HEADS, kv_len, head_dim)
    if "gqa" in call.features:  # the first half of the kv heads, still views of the same memory
        k, v = k[:, : HEADS // 2], v[:, : HEADS // 2]
    options = {name: VARIANT_OPTIONS[name] for name in ("window", "softcap") if name in call.features}
    if "dropout" in call.features:
        options.update(dropout_p=VARIANT_OPTIONS["dropout_p"], dropout_seed=VARIANT_OPTIONS["dropout_seed"])
    return SimpleNamespace(q=q, k=k, v=v, do=do, options=Options(call.causal, head_dim**-0.5, **options))


# ---------------------------------------------------------------------------------------
# The kernels: how the launch code runs each one with a given config
# ---------------------------------------------------------------------------------------


def _plan(x: SimpleNamespace, cfg: LaunchConfig):
    """The launch code's plan for these inputs, with cfg for every kernel it launches (its
    variant fields only for the kernels that have them: VARIANT_KERNELS)."""
    plan = triton_attention._plan_for(x.q, x.k, x.v, x.options)
    configs = {
        kernel: cfg._replace(**{name: False for name in cfg.variants if kernel not in VARIANT_KERNELS[name]})
        for kernel in TABLE_KERNELS
    }
    return dataclasses.replace(plan, configs=configs)


def _run_forward(x: SimpleNamespace, cfg: LaunchConfig) -> None:
    triton_attention._forward(x.q, x.k, x.v, x.options, None, _plan(x, cfg))


def _run_backward(x: SimpleNamespace, cfg: LaunchConfig) -> None:
    plan = _plan(x, cfg)
    out, lse = triton_attention._forward(x.q, x.k, x.v, x.options, None, plan)
    triton_attention._backward(x.do, x.q, x.k, x.v, out, lse, x.options, None, plan)


def _run_decode(x: SimpleNamespace, cfg: LaunchConfig) -> None:
    triton_attention._decode(x.q, x.k, x.v, x.options, None, _plan(x, cfg))


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A table kernel: the launch code that runs it, and the JIT kernel whose launch takes the row's config."""

    run: Callable[[SimpleNamespace, LaunchConfig], None]
    jit: object  # a triton JITFunction
    lengths: tuple[str, ...] = tuple(name for name, _ in LENGTH_CLASSES)  # the length classes that launch it


KERNELS = {
    "fwd": Kernel(_run_forward, triton_attention._attn_fwd),
    "dkdv": Kernel(_run_backward, triton_attention._attn_bwd_dkdv),
    "dq": Kernel(_run_backward, triton_attention._attn_bwd_dq),
    "decode": Kernel(_run_decode, triton_decode._decode_split, lengths=("decode",)),
}


# ---------------------------------------------------------------------------------------
# What Triton's JIT would compile, and compiling it
# ---------------------------------------------------------------------------------------


def _require_triton_jit() -> None:
    """Fail with one line if this Triton lacks the JIT hooks the check drives (Triton 3.6 and 3.9 have them)."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    knobs = getattr(triton, "knobs", None)
    missing = [
        name
        for name, present in (
            ("triton.knobs.runtime.jit_cache_hook", knobs is not None and hasattr(knobs.runtime, "jit_cache_hook")),
            ("triton.knobs.nvidia.dump_ptxas_log", knobs is not None and hasattr(knobs.nvidia, "dump_ptxas_log")),
            ("triton.runtime.driver.set_active", hasattr(driver, "set_active")),
            ("JITFunction.preload", hasattr(JITFunction, "preload")),
        )
        if not present
    ]
    if missing:
        sys.exit(f"compile_check needs Triton 3.6 or newer: {triton.__version__} lacks {', '.join(missing)}")


class _TargetOnly:
    """Answers the driver calls a launch makes before it compiles, for a GPU that is not here."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> str:
        return f"compile_check:{self.target.arch}"  # keys the JIT's per-device caches: one per target

    def get_current_stream(self, device=None) -> None:
        return None


@contextlib.contextmanager
def _on(arch: str):
    """Make Triton's JIT see the GPU of `arch` as the current device."""
    from triton.runtime import driver

    previous = getattr(driver, "_active", None)  # None until first used: then made lazily again
    driver.set_active(_TargetOnly(TARGETS[arch]))
    try:
        yield
    finally:
        driver.set_active(previous)


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch as Triton's JIT specializes it for a target."""

    kernel: str  # qualified name, e.g. kernels.triton_attention._attn_fwd
    specialization: str  # Triton's serialized specialization (JSON): signature, constants, attrs, options

    @property
    def data(self) -> dict:
        return json.loads(self.specialization)

    @property
    def signature(self) -> dict[str, str]:
        """Argument name -> Triton type ("*bf16", "i32", "fp32", "constexpr", ...)."""
        return self.data["signature"]

    @property
    def constants(self) -> dict[str, object]:
        """Argument name -> value, for the arguments compiled in as constants."""
        names = list(self.signature)
        return {names[path[0]]: value for path, value in zip(self.data["constant_keys"], self.data["constant_vals"])}

    @property
    def divisible_by_16(self) -> set[str]:
        """The arguments marked divisible by 16 (pointers aligned to 16 bytes, integers multiples of 16)."""
        names = list(self.signature)
        return {
            names[path[0]]
            for path, attrs in zip(self.data["attrs_keys"], self.data["attrs_vals"])
            if ["tt.divisibility", 16] in attrs
        }


def record_launches(arch: str, run: Callable[[], object]) -> list[Launch]:
    """Every kernel launch run() makes, as Triton's JIT would specialize it on `arch`.

    Nothing is compiled or launched: the hook that sees each specialization tells the JIT
    it is taken care of, and the launch returns there.
    """
    recorded = []

    def record(*, fn, compile, **_) -> bool:
        if "specialization_data" not in compile:
            raise RuntimeError(f"triton {triton.__version__}'s jit_cache_hook gets no specialization_data")
        recorded.append(Launch(f"{fn.module}.{fn.name}", compile["specialization_data"]))
        return True  # taken care of: the JIT neither compiles nor launches

    with _on(arch), triton.knobs.runtime.scope():
        triton.knobs.runtime.jit_cache_hook = record
        run()
    return recorded


def compile_launch(arch: str, launch: Launch) -> dict:
    """Compile a recorded launch for `arch`: registers and spilled bytes per thread, shared memory
    in bytes, and how many of each FEATURES instruction the PTX holds. Raises if it does not compile."""
    module, _, name = launch.kernel.rpartition(".")
    kernel = getattr(importlib.import_module(module), name)
    log = io.StringIO()
    with (
        _on(arch),
        triton.knobs.nvidia.scope(),
        triton.knobs.compilation.scope(),
        contextlib.redirect_stdout(log),
    ):
        triton.knobs.nvidia.dump_ptxas_log = True  # Triton prints `ptxas -v` of the cubin it builds
        triton.knobs.compilation.always_compile = True  # from Triton's cache there would be no ptxas log
        compiled = kernel.preload(launch.specialization)
    ptxas = log.getvalue()
    regs = re.search(r"Used (\d+) registers", ptxas)
    spill = re.search(r"(\d+) bytes spill stores", ptxas)
    if regs is None:
        raise RuntimeError(f"no `ptxas -v` output for {launch.kernel}")
    ptx = compiled.asm["ptx"]
    return {
        "regs": int(regs.group(1)),
        "spill": int(spill.group(1)) if spill else 0,
        "smem": compiled.metadata.shared,
        **{feature: len(re.findall(pattern, ptx)) for feature, pattern in FEATURES.items()},
    }


def _compile_or_error(arch: str, launch: Launch) -> dict:
    """compile_launch, with a compile error as {"error": its first line} (for worker processes)."""
    try:
        return compile_launch(arch, launch)
    except Exception as err:  # report every failing row, not just the first
        text = str(err).strip()
        return {"error": text.splitlines()[0] if text else repr(err)}


# ---------------------------------------------------------------------------------------
# Rows: which calls each table row serves, what they compile to, what is wrong with it
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    """One (arch, row key, head dim) entry of the table and the programs its calls compile to."""

    arch: str
    kernel: str
    dtype_class: str
    causal: bool | None
    length: str | None
    head_dim: int
    cfg: LaunchConfig  # what the row's calls launch with
    programs: dict[Launch, list[Call]] = dataclasses.field(default_factory=dict)
    table_cfg: LaunchConfig | None = None  # for a variant of a table row (--hopper-variants): the row's own config

    def __post_init__(self):
        self.table_cfg = self.table_cfg or self.cfg

    def calls(self, variants: bool = False) -> list[Call]:
        """The calls a GPU of this arch sends to this row's config (the most specific row wins);
        with `variants`, also the fused-QKV ones with every feature of VARIANT on."""
        plain = [
            Call(layout, causal, length)
            for causal in (True, False)
            if self.causal in (ANY, causal)
            for length in KERNELS[self.kernel].lengths
            if self.length in (ANY, length)
            and table_config(self.arch, self.kernel, self.dtype_class, causal, length, self.head_dim) == self.table_cfg
            for layout in LAYOUTS
        ]
        if not variants:
            return plain
        features = tuple(f for f in VARIANT if not (self.kernel == "decode" and f == "dropout"))
        return plain + [dataclasses.replace(call, features=features) for call in plain if call.layout == "fused QKV"]

    def label(self) -> str:
        show = lambda value: "any" if value is None else str(value)  # noqa: E731
        return (
            f"{self.arch:8} {self.kernel:6} {self.dtype_class:8} {show(self.causal):6} {show(self.length):6} "
            f"{self.head_dim:>4} {self.cfg.label():16}"
        )


def table_rows(archs, variants: bool = False, hopper_variants: bool = False) -> list[Row]:
    """Every row of the table for `archs`, with the programs its calls launch (recorded, not compiled);
    with `hopper_variants`, after each sm90 row its config variants (variant_configs)."""
    rows = []
    for arch in archs:
        for (kernel, dtype_class, causal, length), by_head_dim in TABLE[arch].items():
            for head_dim, cfg in by_head_dim.items():
                row = record_row(Row(arch, kernel, dtype_class, causal, length, head_dim, cfg), variants)
                rows.append(row)
                if hopper_variants and arch == "sm90":
                    for variant in variant_configs(kernel, dtype_class, length, cfg):
                        rows.append(record_row(dataclasses.replace(row, cfg=variant, programs={}), variants))
    return rows


def record_row(row: Row, variants: bool = False) -> Row:
    """Fill row.programs: each distinct launch of the row's JIT kernel, and the calls that make it."""
    kernel = KERNELS[row.kernel]
    name = f"{kernel.jit.fn.__module__}.{kernel.jit.fn.__qualname__}"
    for call in row.calls(variants):
        x = inputs(call, DTYPES[row.dtype_class], row.head_dim)
        launches = [
            launch for launch in record_launches(row.arch, lambda: kernel.run(x, row.cfg)) if launch.kernel == name
        ]
        if not launches:
            raise RuntimeError(f"{row.label().strip()}: the launch code for {call} launched no {name}")
        for launch in launches:
            row.programs.setdefault(launch, []).append(call)
    return row


def problems(row: Row, result: dict, variant: bool = False) -> list[str]:
    """What is wrong with one compiled program of `row`; empty if nothing. A `variant` program
    (is_variant) is held to everything but the spill limit."""
    if "error" in result:
        return [f"does not compile: {result['error']}"]
    found = []
    limit, smem_limit = SPILL_LIMIT[row.dtype_class], SHARED_MEMORY[row.arch]
    if result["spill"] > limit and not variant:
        found.append(f"spills {result['spill']} bytes per thread (limit {limit})")
    if result["smem"] > smem_limit:
        found.append(f"needs {result['smem'] / 1024:.1f} KiB shared memory, {row.arch} has {smem_limit // 1024} KiB")
    for need in NEEDS:
        if need.applies(row.arch, row.kernel, row.dtype_class, row.cfg) and not any(result[f] for f in need.features):
            found.append(f"no {' or '.join(need.features)}: {need.why}")
    return found


def describe(calls: list[Call], row: Row) -> str:
    """Which of a row's calls `calls` are (those of one or more of its programs), in the terms
    that tell the row's programs apart; "all" if they are all of them."""
    if set(calls) == {call for cs in row.programs.values() for call in cs}:
        return "all"
    parts = []
    fields = (
        ("causal", lambda value: "causal" if value else "full"),
        ("layout", str),
        ("length", str),
        ("features", lambda value: "variant" if value else "plain"),
    )
    for field, show in fields:

        def values(cs, field=field):  # in order, each once
            return list(dict.fromkeys(getattr(c, field) for c in cs))

        if any(values(cs) != values(calls) for cs in row.programs.values()):
            parts.append("/".join(show(value) for value in values(calls)))
    return ", ".join(parts) or "all"


HEADER = (
    f"{'arch':8} {'kernel':6} {'dtype':8} {'causal':6} {'length':6} {'D':>4} {'config':16} {'calls':20} "
    f"{'regs':>4} {'spill':>5} {'smem KiB':>8} {'wgmma':>5} {'mma':>4} {'cp.async':>8} {'tma':>4} {'atomic':>6}  result"
)


def is_variant(row: Row, calls: list[Call]) -> bool:
    """Whether a program is a variant's: a --hopper-variants row, or calls with --variants' features.

    A variant is what a GPU run times against the table's rows, not what the table runs: its
    spills are printed for that run to weigh, and are no failure here. Everything else (it
    compiles, fits, and has the instructions NEEDS asks for) holds for it as for the table's rows.
    """
    return row.cfg != row.table_cfg or all(call.features for call in calls)


def line(row: Row, calls: list[Call], result: dict, found: list[str]) -> str:
    start = f"{row.label()} {describe(calls, row):20}"
    if "error" in result:
        return f"{start} {'FAILED: ' + found[0]}"
    spilling_variant = is_variant(row, calls) and result["spill"] > SPILL_LIMIT[row.dtype_class]
    return (
        f"{start} {result['regs']:>4} {result['spill']:>5} {result['smem'] / 1024:>8.1f} {result['wgmma']:>5} "
        f"{result['mma']:>4} {result['cp.async']:>8} {result['tma']:>4} {result['atomic']:>6}  "
        f"{'; '.join(found) or ('ok (a variant: spills reported, not failed)' if spilling_variant else 'ok')}"
    )


def check(rows: list[Row], jobs: int, out=sys.stdout) -> list[str]:
    """Compile every program of `rows` (in `jobs` processes), print the table; returns one line per failing row."""
    launches = list(dict.fromkeys((row.arch, launch) for row in rows for launch in row.programs))
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            futures = {key: pool.submit(_compile_or_error, *key) for key in launches}
            results = {key: future.result() for key, future in futures.items()}
    else:
        results = {key: _compile_or_error(*key) for key in launches}
    print(HEADER, file=out)
    failures = []
    for row in rows:
        if not row.programs:
            print(f"{row.label()} unused: more specific rows take every call", file=out)
        concerns: dict[str, list[Call]] = {}  # each problem: the calls whose programs have it
        for launch, calls in row.programs.items():
            result = results[row.arch, launch]
            found = problems(row, result, is_variant(row, calls))
            print(line(row, calls, result, found), file=out, flush=True)
            for problem in found:
                concerns.setdefault(problem, []).extend(calls)
        if concerns:
            reasons = []
            for problem, calls in concerns.items():
                which = describe(calls, row)
                reasons.append(problem if which == "all" else f"{problem} [{which}]")
            failures.append(f"{' '.join(row.label().split())}: {'; '.join(reasons)}")
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=(*ARCHS, "all"), default="sm90")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="compile in this many processes")
    parser.add_argument(
        "--variants", action="store_true", help=f"also compile every row with {'+'.join(VARIANT)} on (fused QKV)"
    )
    parser.add_argument(
        "--hopper-variants",
        action="store_true",
        help="also compile every sm90 row with each config variant of its kernel ("
        + "; ".join(
            f"{kernel}: " + ", ".join("+".join(names) for names in of) for kernel, of in HOPPER_VARIANTS.items()
        )
        + ")",
    )
    args = parser.parse_args(argv)
    _require_triton_jit()
    archs = ARCHS if args.arch == "all" else (args.arch,)
    rows = table_rows(archs, args.variants, args.hopper_variants)
    spill = ", ".join(f"{dtype_class} {limit}" for dtype_class, limit in SPILL_LIMIT.items())
    programs = len({(row.arch, launch) for row in rows for launch in row.programs})
    print(f"triton {triton.__version__}; {len(rows)} rows, {programs} programs; spill limit (bytes/thread): {spill}")
    failures = check(rows, max(1, args.jobs))
    if args.hopper_variants:
        for name, why in UNAVAILABLE_VARIANTS.items():
            print(f"{name}: not compiled, refused by the launch code: {why}")
    if failures:
        print(f"\n{len(failures)} row(s) failed:")
        print("\n".join(failures))
        return 1
    print("\nevery row compiled, fits, and has what NEEDS asks for")
    return 0


if __name__ == "__main__":
    sys.exit(main())
