"""Compile every launch config of the table ahead of time, for GPUs this machine need not have.

    TRITON_INTERPRET=0 python -m kernels.compile_check             # the sm90 rows, for sm_90
    TRITON_INTERPRET=0 python -m kernels.compile_check --arch all  # sm90, sm80 and generic rows

For each table row (kernels/triton_configs.py) and head dim, compiles the kernel with
triton.compile for the row's GPU (sm90 -> sm_90, sm80 -> sm_80, generic -> sm_86) and prints
registers per thread, spilled bytes (ptxas -v) and shared memory. Exits 1 if a
config spills more than SPILL_LIMIT bytes or needs more shared memory than the arch has.
No GPU is needed: Triton ships ptxas. The causal variant is compiled (it holds
every code path of the non-causal one, plus the masks).

Written against Triton 3.9: ASTSource(fn, signature={name: type}, constexprs={name: value},
attrs={(index,): [["tt.divisibility", 16]]}) and its get_ptxas(arch). It only needs to run
on the machine that checks the table, not on every Triton the kernels support.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") != "0":
    sys.exit("compile_check compiles for a real GPU: run it with TRITON_INTERPRET=0")
os.environ["TRITON_INTERPRET"] = "0"  # kernels.triton_runtime then leaves the kernels compilable

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia import compiler as nvidia_compiler  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import triton_attention, triton_decode  # noqa: E402
from kernels.triton_configs import ARCHS, SHARED_MEMORY, TABLE  # noqa: E402

TARGETS = {"sm90": 90, "sm80": 80, "generic": 86}
SPILL_LIMIT = 64  # bytes per thread: a few spilled registers are harmless, hundreds are not
KERNELS = {
    "fwd": triton_attention._attn_fwd,
    "dkdv": triton_attention._attn_bwd_dkdv,
    "dq": triton_attention._attn_bwd_dq,
    "decode": triton_decode._decode_split,
}
DTYPES = {"16-bit": torch.bfloat16, "float32": torch.float32}
TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def signature(kernel, dtype: torch.dtype) -> tuple[dict, dict]:
    """Triton's signature and attributes for a launch like ours: pointers and row strides
    16-aligned (as Triton finds them on real tensors), lengths unspecialized."""
    sig, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if kernel.params[i].is_constexpr:
            sig[name] = "constexpr"
        elif name in ("Lse", "Delta", "PartialOut", "PartialLse"):  # float32 buffers
            sig[name], attrs[(i,)] = "*fp32", [["tt.divisibility", 16]]
        elif name in ("H", "N_Q", "N_K", "split_size"):
            sig[name] = "i32"
        elif name[0].isupper():  # a tensor
            sig[name], attrs[(i,)] = f"*{TRITON_TYPES[dtype]}", [["tt.divisibility", 16]]
        elif name.startswith("stride_"):
            sig[name] = "i32"
            if not name.endswith("d"):  # row strides are multiples of head_dim >= 16
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:  # sm_scale, qk_scale
            sig[name] = "fp32"
    return sig, attrs


def resources(ptx: str, arch: int) -> dict:
    """Registers per thread and spilled bytes (stores), from `ptxas -v` on the kernel's PTX."""
    ptxas = nvidia_compiler.get_ptxas(arch).path  # the one Triton itself uses for this arch
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        log = subprocess.run(
            [ptxas, "-v", f"--gpu-name={gpu}", path, "-o", os.path.join(tmp, "kernel.cubin")],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores", log)
    return {"regs": int(regs.group(1)) if regs else 0, "spill": int(spill.group(1)) if spill else 0}


def compile_one(arch: str, kernel_name: str, dtype: torch.dtype, head_dim: int, cfg) -> dict:
    kernel = KERNELS[kernel_name]
    sig, attrs = signature(kernel, dtype)
    constexprs = dict(
        HEAD_DIM=head_dim, CAUSAL=True, FP32_DOT=dtype == torch.float32, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n
    )
    src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", TARGETS[arch], 32),
        options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
    )
    return {**resources(compiled.asm["ptx"], TARGETS[arch]), "smem": compiled.metadata.shared}


def _any(value) -> str:
    return "any" if value is None else str(value)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=(*ARCHS, "all"), default="sm90")
    args = parser.parse_args(argv)
    archs = ARCHS if args.arch == "all" else (args.arch,)
    failures, worst = 0, {}
    print(f"triton {triton.__version__}; spill limit {SPILL_LIMIT} bytes/thread")
    print(
        f"{'arch':8} {'kernel':5} {'dtype':8} {'causal':6} {'length':6} {'D':>4} {'config':16} "
        f"{'regs':>4} {'spill':>5} {'smem KiB':>8}  result"
    )
    for arch in archs:
        limit = SHARED_MEMORY[arch]
        for (kernel_name, dtype_class, causal, length), row in TABLE[arch].items():
            for head_dim, cfg in row.items():
                label = (
                    f"{arch:8} {kernel_name:5} {dtype_class:8} {_any(causal):6} {_any(length):6} "
                    f"{head_dim:>4} {str(tuple(cfg)):16}"
                )
                try:
                    r = compile_one(arch, kernel_name, DTYPES[dtype_class], head_dim, cfg)
                except Exception as err:  # report every failing config, not just the first
                    failures += 1
                    print(f"{label} FAILED: {str(err).strip().splitlines()[0] if str(err).strip() else err!r}")
                    continue
                bad = r["spill"] > SPILL_LIMIT or r["smem"] > limit
                failures += bad
                w = worst.setdefault((arch, kernel_name), {"regs": 0, "spill": 0, "smem": 0})
                for name in w:
                    w[name] = max(w[name], r[name])
                print(
                    f"{label} {r['regs']:>4} {r['spill']:>5} {r['smem'] / 1024:>8.1f}  {'TOO BIG' if bad else 'ok'}",
                    flush=True,
                )
    print("\nworst per kernel (regs, spill bytes, smem KiB):")
    for (arch, kernel_name), w in worst.items():
        print(f"  {arch:8} {kernel_name:5} {w['regs']:>4} {w['spill']:>5} {w['smem'] / 1024:>7.1f}")
    print(f"{failures} config(s) failed" if failures else "every config compiled and fits")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
