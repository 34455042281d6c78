"""What the benchmarks measure, defined once. The models are the default run's settings
(gpt.config.TrainConfig, with its GPTConfig) changed with dataclasses.replace:

    default_run(dtype)   gpt.train's default run: its model, batch and optimizer (Muon + AdamW)
    long_run(dtype)      the same at T 1024 with d_model 512, 8 heads, batch 16: attention is a
                         larger share of its step
    attention_call(run)  (batch, heads, T, head dim) of one attention call of that run's model

Plans:

    FULL     python -m bench.quick on a GPU
    SMOKE    python -m bench.quick --smoke: tiny shapes through the same code, seconds on any machine
    suite()  pytest bench --benchmark-only: a wider grid, on a GPU or a CPU, narrowed by

             BENCH_DEVICE              cuda | cpu (default: cuda when available)
             BENCH_SEQLENS             e.g. 1024,4096 (GPU default 512..16k, CPU 128..1024)
             BENCH_HEAD_DIMS           e.g. 128 (default 64,128)
             BENCH_DTYPES              e.g. bfloat16 (GPU default bfloat16,float16, CPU float32)
             BENCH_TIME                seconds of timed calls per CPU measurement (default 0.5)
             BENCH_CPU_THREADS         torch.set_num_threads on a CPU. On a shared machine use 1: a
                                       multi-threaded op waits for every thread to get a core, which
                                       measures the neighbours' load instead of the kernel

Attention shapes keep the tokens per call constant across lengths (FlashAttention-2's benchmark):
batch = tokens // T and heads = model dim // head dim (bench.flops.constant_token_shape).
"""

import functools
import os
from dataclasses import dataclass, replace

import torch

from bench import backends, flops
from bench.core import Timer
from bench.flops import AttentionShape
from gpt.config import TrainConfig
from gpt.model import GPTConfig


def default_run(dtype: str) -> TrainConfig:
    return TrainConfig(dtype=dtype)


def long_run(dtype: str) -> TrainConfig:
    run = default_run(dtype)
    return replace(run, seq_len=1024, batch_size=16, model=replace(run.model, d_model=512, n_head=8))


def attention_call(run: TrainConfig) -> AttentionShape:
    model = run.model
    return AttentionShape(run.batch_size, model.n_head, run.seq_len, model.d_model // model.n_head)


@dataclass(frozen=True)
class Plan:
    device: str
    timer: Timer  # kernel, decode and host-shape calls
    # The kernel table: every backend on the same inputs, causal, fwd and fwd + bwd.
    table_backends: tuple[str, ...]
    table_dtypes: tuple[str, ...]
    table_head_dims: tuple[int, ...]
    table_seqlens: tuple[int, ...]
    table_tokens: int  # batch = tokens // T
    table_model_dim: int  # heads = model dim // head dim
    # Training and sampling: (name, run) pairs; the last run's attention call is also the shape of
    # the parity and host-time cells (q, k, v as views of its fused QKV projection).
    runs: tuple[tuple[str, TrainConfig], ...]
    train_timer: Timer  # training steps
    dtype: str = "bfloat16"  # of the parity, host-time and decode cells
    parity_decode: tuple[int, int, int, int] = (2, 8, 3001, 128)  # (batch, heads, kv_len, head dim), q_len 1
    host_calls: int = 30  # calls issued back to back per timed run
    host_repeats: int = 5  # timed runs; the median is reported
    decode_head_dims: tuple[int, ...] = (64, 128)
    decode_kv_lens: tuple[int, ...] = (64, 256, 1024, 4096, 8192)
    decode_batch: int = 1
    decode_heads: int = 8
    sample_tokens: int = 200
    # The suites only: memory, and (on a CPU) the one problem small enough for our interpreted kernel.
    memory_shape: tuple[int, int, int] = (1, 8, 128)  # (batch, heads, head dim)
    memory_dtype: str = "bfloat16"
    memory_seqlens: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384)
    tiny: AttentionShape | None = None


FULL = Plan(
    device="cuda",
    timer=Timer(warmup_ms=25, rep_ms=100),
    table_backends=(*backends.ours(), *backends.PEERS),
    table_dtypes=("bfloat16",),
    table_head_dims=(128, 64),
    table_seqlens=(1024, 4096, 16384),
    table_tokens=flops.GPU_TOKENS,
    table_model_dim=flops.GPU_MODEL_DIM,
    runs=(("default", default_run("bfloat16")), ("long", long_run("bfloat16"))),
    train_timer=Timer(warmup_ms=100, rep_ms=2000),
)

# Our kernel runs interpreted without CUDA, about a second per call even here. Odd lengths
# exercise the masked edges; the model keeps the adaptive head.
_SMOKE_RUN = replace(
    default_run("bfloat16"),
    batch_size=2,
    seq_len=16,
    model=replace(GPTConfig(), vocab_size=256, adaptive_cutoffs=[32, 128], n_layer=1, n_head=2, d_model=32),
)
_FEW_CALLS = Timer(warmup_ms=5, rep_ms=20, min_calls=2, max_calls=2, warmup=0)
SMOKE = replace(
    FULL,
    device="cpu",
    timer=_FEW_CALLS,
    table_head_dims=(32, 16),
    table_seqlens=(32, 64),
    table_tokens=64,
    table_model_dim=64,
    runs=(("default", _SMOKE_RUN), ("long", replace(_SMOKE_RUN, seq_len=32, batch_size=1))),
    train_timer=_FEW_CALLS,
    parity_decode=(1, 2, 37, 32),
    host_calls=2,
    host_repeats=2,
    decode_head_dims=(16, 32),
    decode_kv_lens=(17, 40),
    decode_heads=2,
    sample_tokens=4,
)


def _env_list(name: str, default, cast=str) -> tuple:
    raw = os.environ.get(name, "").strip()
    return tuple(cast(x) for x in raw.split(",") if x.strip()) if raw else tuple(default)


@functools.cache
def suite() -> Plan:
    """The pytest suites' plan on this machine (see the module docstring for the BENCH_* variables)."""
    device = os.environ.get("BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("BENCH_DEVICE=cuda, but torch.cuda.is_available() is False")
    on_cuda = device == "cuda"
    seqlens = _env_list(
        "BENCH_SEQLENS", (512, 1024, 2048, 4096, 8192, 16384) if on_cuda else (128, 256, 512, 1024), int
    )
    plan = replace(
        FULL,
        device=device,
        table_backends=backends.names(),
        table_dtypes=_env_list("BENCH_DTYPES", ("bfloat16", "float16") if on_cuda else ("float32",)),
        table_head_dims=_env_list("BENCH_HEAD_DIMS", (64, 128), int),
        table_seqlens=seqlens,
        memory_seqlens=tuple(t for t in seqlens if t >= 1024) or seqlens,
    )
    if on_cuda:
        return plan
    if os.environ.get("BENCH_CPU_THREADS"):
        torch.set_num_threads(int(os.environ["BENCH_CPU_THREADS"]))
    # A 2-core CPU cannot do 16k tokens of O(T^2) reference attention in minutes; our kernel,
    # interpreted, is timed only on the tiny problem (~12 s per forward at T 128 with 16 x 4 heads).
    return replace(
        plan,
        timer=Timer(cpu_seconds=float(os.environ.get("BENCH_TIME", "0.5"))),
        table_tokens=flops.CPU_TOKENS,
        table_model_dim=flops.CPU_MODEL_DIM,
        runs=(("default", default_run("float32")),),
        train_timer=Timer(cpu_seconds=1.0, min_calls=5, max_calls=10),
        memory_shape=(1, 4, 64),
        memory_dtype="float32",
        memory_seqlens=seqlens,
        tiny=AttentionShape(batch=1, heads=2, seqlen=128, head_dim=64),
    )
