"""What each benchmark cell measures: attention passes, parity against float64, host time per
call, decoding, peak memory, training steps and sampling. bench.quick and the pytest suites both
call these; each returns the cell's numbers, or raises core.Skipped when it cannot run here.

Every backend's attention comes from its registration (bench/backends.py); a backend's first
call at each (head dim, pass) is timed by Run.first_call: it pays for compilation.
"""

import math
import statistics
import time
from dataclasses import replace

import torch

import kernels
from bench import core, targets
from bench.backends import BACKENDS, unavailable_reason
from bench.flops import AttentionShape, attention_flops, tflops
from gpt.config import DTYPES, TrainConfig
from gpt.schedule import Schedule
from gpt.step import build_model, configure_optimizer, evaluate, train_step

# ---------------------------------------------------------------------------------------------
# Inputs and passes
# ---------------------------------------------------------------------------------------------


def randn(*shape, dtype, device, seed: int) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(*shape, dtype=dtype, device=device, generator=generator)


def qkv(shape: AttentionShape, dtype: torch.dtype, device, requires_grad: bool) -> tuple:
    """Three (B, H, T, D) tensors, seeds 0, 1, 2."""
    B, H, T, D = shape.batch, shape.heads, shape.seqlen, shape.head_dim
    return tuple(randn(B, H, T, D, dtype=dtype, device=device, seed=s).requires_grad_(requires_grad) for s in range(3))


def fused_qkv_views(qkv: torch.Tensor, heads: int) -> tuple:
    """(B, T, 3*H*D) -> three (B, H, T, D) strided views, exactly as CausalSelfAttention makes them."""
    B, T, three_c = qkv.shape
    q, k, v = qkv.view(B, T, 3, heads, three_c // (3 * heads)).unbind(dim=2)
    return tuple(t.transpose(1, 2) for t in (q, k, v))


def pass_fn(attn, q, k, v, mode: str):
    """The timed work: forward only (no autograd graph), or forward + backward."""
    if mode == "fwd":

        def forward():
            with torch.no_grad():
                return attn(q, k, v)

        return forward
    if mode != "fwd_bwd":
        raise ValueError(f"mode must be fwd or fwd_bwd, got {mode!r}")
    dout = randn(*q.shape, dtype=q.dtype, device=q.device, seed=1)

    def forward_backward():
        # autograd.grad returns fresh gradients instead of accumulating into .grad
        return torch.autograd.grad(attn(q, k, v), (q, k, v), dout)

    return forward_backward


def attention_fn(backend: str, seqlen: int, device):
    """`backend`'s attention callable at this length, or Skipped with the reason it cannot run here."""
    reason = unavailable_reason(backend, device)
    if reason:
        raise core.Skipped(reason)
    return BACKENDS[backend].make(seqlen, device)


def attention_key(backend: str, mode: str, dtype: str, shape: AttentionShape) -> dict:
    """The fields that say which attention problem a cell measured."""
    return {"backend": backend, "pass": mode, "dtype": dtype, **shape.as_dict()}


def decode_key(cache: AttentionShape) -> dict:
    """The same for one query against cache.seqlen cached keys."""
    return {"batch": cache.batch, "heads": cache.heads, "q_len": 1, "kv_len": cache.seqlen, "head_dim": cache.head_dim}


def dtype_of(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


# ---------------------------------------------------------------------------------------------
# Attention cells
# ---------------------------------------------------------------------------------------------


def attention(run: core.Run, backend: str, mode: str, dtype: str, shape: AttentionShape, timer: core.Timer) -> dict:
    """Median time and TFLOP/s of one causal call (bench.flops' count) on random inputs."""
    device = run.device
    attn = attention_fn(backend, shape.seqlen, device)
    q, k, v = qkv(shape, dtype_of(dtype), device, requires_grad=mode == "fwd_bwd")
    fn = pass_fn(attn, q, k, v, mode)
    with BACKENDS[backend].context():
        run.first_call(backend, shape.head_dim, mode, "kernel_table", fn)
        timing = timer(fn, device)
    flops = attention_flops(shape.batch, shape.heads, shape.seqlen, shape.seqlen, shape.head_dim, mode=mode)
    return {**timing, "tflops": tflops(flops, timing["ms"] * 1e-3)}


def max_abs_error(actual: torch.Tensor, exact: torch.Tensor) -> float:
    """max |actual - exact| in float64; inf where actual is NaN or Inf."""
    diff = (actual.detach().double() - exact.detach()).abs()
    return float(torch.nan_to_num(diff, nan=math.inf).max())


def error_rows(ours: dict, sdpa: dict, exact: dict, dtype: str) -> dict:
    """Per tensor: our max error, sdpa's, and how much of the project's tolerance ours uses
    (targets.ERROR_RATIO x sdpa's + targets.ABS_FLOOR[dtype]; at most 1 passes)."""
    rows = []
    for name, exact_value in exact.items():
        err, base = max_abs_error(ours[name], exact_value), max_abs_error(sdpa[name], exact_value)
        used = err / (targets.ERROR_RATIO * base + targets.ABS_FLOOR[dtype])
        rows.append({"tensor": name, "max_err": err, "sdpa_max_err": base, "tolerance_used": used})
    return {"errors": rows, "tolerance_used": max(r["tolerance_used"] for r in rows)}


def parity(run: core.Run, backend: str, shape: AttentionShape, dtype: str) -> dict:
    """Worst error of out, dq, dk, dv against float64, next to sdpa's on the same inputs: causal
    fwd + bwd with q, k, v as views of a fused QKV projection (the model's layout)."""
    B, H, T, D = shape.batch, shape.heads, shape.seqlen, shape.head_dim
    device = run.device
    attn = attention_fn(backend, T, device)
    qkv64 = randn(B, T, 3 * H * D, dtype=torch.float64, device=device, seed=0)
    dout64 = randn(B, H, T, D, dtype=torch.float64, device=device, seed=1)

    def outputs(attn, dtype):
        fused = qkv64.to(dtype, copy=True).requires_grad_()  # a fresh leaf per backend
        out = attn(*fused_qkv_views(fused, H))
        out.backward(dout64.to(dtype))
        dq, dk, dv = fused.grad.view(B, T, 3, H, D).unbind(dim=2)  # (B, T, H, D) each
        return {"out": out, "dq": dq, "dk": dk, "dv": dv}

    exact = outputs(BACKENDS["reference"].make(T, device), torch.float64)
    ours = run.first_call(backend, D, "fwd_bwd", "parity", lambda: outputs(attn, dtype_of(dtype)))
    return error_rows(ours, outputs(BACKENDS["sdpa"].make(T, device), dtype_of(dtype)), exact, dtype)


def decode_parity(run: core.Run, backend: str, shape: AttentionShape, dtype: str) -> dict:
    """The same for one query against shape.seqlen cached keys (our kernel's decode path)."""
    B, H, Tk, D = shape.batch, shape.heads, shape.seqlen, shape.head_dim
    attn = attention_fn(backend, Tk, run.device)
    q64 = randn(B, H, 1, D, dtype=torch.float64, device=run.device, seed=2)
    k64, v64 = (randn(B, H, Tk, D, dtype=torch.float64, device=run.device, seed=s) for s in (3, 4))

    def outputs(attn, dtype):
        return {"out": attn(q64.to(dtype), k64.to(dtype), v64.to(dtype))}

    exact = outputs(BACKENDS["reference"].make(Tk, run.device), torch.float64)
    ours = run.first_call(backend, D, "decode", "parity", lambda: outputs(attn, dtype_of(dtype)))
    return error_rows(ours, outputs(BACKENDS["sdpa"].make(Tk, run.device), dtype_of(dtype)), exact, dtype)


def host_time(run: core.Run, backend: str, mode: str, shape: AttentionShape, dtype: str, calls: int, repeats: int):
    """Host, device and wall time per call, q, k, v as views of a fused projection (the model's call)."""
    B, H, T, D = shape.batch, shape.heads, shape.seqlen, shape.head_dim
    attn = attention_fn(backend, T, run.device)
    fused = randn(B, T, 3 * H * D, dtype=dtype_of(dtype), device=run.device, seed=0).requires_grad_(mode == "fwd_bwd")
    fn = pass_fn(attn, *fused_qkv_views(fused, H), mode)
    run.first_call(backend, D, mode, "host_time", fn)
    fn()  # one more warm-up call: allocator and caches settle
    return {**core.host_and_wall_us(fn, run.device, calls, repeats), **core.device_us(fn, run.device, calls)}


def decode(run: core.Run, backend: str, shape: AttentionShape, dtype: str, timer: core.Timer, calls, repeats):
    """q_len 1 against shape.seqlen cached keys, as model.generate calls attention for each new token:
    q a view of this step's fused projection, k and v the cache (contiguous, as torch.cat makes it)."""
    B, H, Tk, D = shape.batch, shape.heads, shape.seqlen, shape.head_dim
    attn = attention_fn(backend, Tk, run.device)
    q, _, _ = fused_qkv_views(randn(B, 1, 3 * H * D, dtype=dtype_of(dtype), device=run.device, seed=0), H)
    k, v = (randn(B, H, Tk, D, dtype=dtype_of(dtype), device=run.device, seed=s) for s in (1, 2))
    fn = pass_fn(attn, q, k, v, "fwd")
    run.first_call(backend, D, "decode", "decode", fn)
    return {**timer(fn, run.device), **core.host_and_wall_us(fn, run.device, calls, repeats)}


def memory(run: core.Run, backend: str, shape: AttentionShape, dtype: str, timer: core.Timer) -> dict:
    """Peak memory of one causal fwd + bwd beyond its inputs (q, k, v, dout), after timing it
    (which also warms it up: autotuning and lazy workspaces are not the steady-state peak)."""
    attn = attention_fn(backend, shape.seqlen, run.device)
    q, k, v = qkv(shape, dtype_of(dtype), run.device, requires_grad=True)
    fn = pass_fn(attn, q, k, v, "fwd_bwd")
    with BACKENDS[backend].context():
        timing = timer(fn, run.device)
        peak = core.peak_bytes(fn, run.device)
    tensor_bytes = q.numel() * q.element_size()
    return {**timing, "peak_bytes": peak, "peak_mib": peak / 2**20, "peak_per_qkv_tensor": peak / tensor_bytes}


# ---------------------------------------------------------------------------------------------
# Training and sampling
# ---------------------------------------------------------------------------------------------


class TrainingRun:
    """The model, optimizer and batches of one backend's training run, built as gpt.train builds
    them (gpt.step: build_model, configure_optimizer; Muon + AdamW by default), outside any timing.

    batches: [(x, y), ...] on the device, cycled through; step() is gpt.step.train_step on the next.
    """

    def __init__(self, cfg: TrainConfig, backend: str, device, batches: list, vocab_size: int, total_steps: int):
        from gpt.cpu import keep_freed_memory

        if torch.device(device).type == "cpu":
            keep_freed_memory()  # as gpt.train does on a CPU
        reason = kernels.unavailable_reason(backend, device)
        if reason:
            raise core.Skipped(reason)
        self.cfg, self.batches, self.steps = cfg, batches, 0
        config = replace(cfg.model, vocab_size=vocab_size, block_size=cfg.seq_len, attn=backend)
        self.model = build_model(config, device, seed=cfg.seed)
        self.optimizer = configure_optimizer(self.model, cfg.lr, cfg.weight_decay, device, cfg.muon)
        self.schedule = Schedule.fixed(cfg.lr, cfg.warmup, total_steps, cfg.decay)
        self.amp_dtype = DTYPES[cfg.dtype]

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.seq_len

    def step(self) -> torch.Tensor:
        batch = self.batches[self.steps % len(self.batches)]
        lr = self.schedule.lr(self.steps)
        loss = train_step(
            self.model, self.optimizer, [batch], lr=lr, grad_clip=self.cfg.grad_clip, amp_dtype=self.amp_dtype
        )
        self.steps += 1
        return loss

    def val_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        return evaluate(self.model, inputs, targets, batch_size=self.cfg.batch_size, amp_dtype=self.amp_dtype)


def optimizer_name(cfg: TrainConfig, device) -> dict:
    from gpt.muon import orthogonalization_dtype

    if not cfg.muon:
        return {"optimizer": "AdamW", "orthogonalization": None}
    precision = str(orthogonalization_dtype(torch.device(device))).removeprefix("torch.")
    return {"optimizer": "Muon + AdamW", "orthogonalization": precision}


def run_key(name: str, cfg: TrainConfig) -> dict:
    """The fields that say which training run a training cell measured."""
    m = cfg.model
    return {
        "model": name,
        "shape": f"{m.n_layer} layers, d_model {m.d_model}, {m.n_head} heads, {m.head} head",
        "batch_size": cfg.batch_size,
        "seq_len": cfg.seq_len,
    }


def random_batches(cfg: TrainConfig, device, count: int = 4) -> list:
    """A few batches of random tokens, made on the device up front: no data loading in the loop."""
    generator = torch.Generator(device=device).manual_seed(0)
    shape = (count, cfg.batch_size, cfg.seq_len + 1)
    tokens = torch.randint(cfg.model.vocab_size, shape, device=device, generator=generator)
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def train_throughput(training: TrainingRun, timer: core.Timer, device) -> dict:
    """Tokens/s of training.step(), timed by the core timer after a first step (compilation)."""
    first_step_s = core.wall_seconds(training.step, device)
    timing = timer(training.step, device)
    return {
        "first_step_s": first_step_s,
        **timing,
        "tokens_per_s": training.tokens_per_step / (timing["ms"] * 1e-3),
        **optimizer_name(training.cfg, device),
    }


def sample(cfg: TrainConfig, backend: str, device, tokens: int) -> dict:
    """Tokens/s of model.generate (KV cache, batch 1, float32), as gpt.sample runs it: the wall
    time of one whole generation after a shorter one (which compiles the decode lengths)."""
    reason = kernels.unavailable_reason(backend, device)
    if reason:
        raise core.Skipped(reason)
    config = replace(cfg.model, block_size=cfg.seq_len, attn=backend)
    model = build_model(config, device, seed=cfg.seed).eval()
    prompt = torch.zeros(1, 1, dtype=torch.long, device=device)

    def generate(n):
        return model.generate(prompt, n, generator=torch.Generator(device=device).manual_seed(0))

    first_s = core.wall_seconds(lambda: generate(min(16, tokens)), device)
    seconds = core.wall_seconds(lambda: generate(tokens), device)
    return {"first_generate_s": first_s, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def time_to_loss(make_run, val: tuple, target_loss: float, eval_every: int, max_steps: int, rounds: int, device):
    """Wall seconds from a fresh TrainingRun (make_run()) to the first validation loss <= target_loss,
    checked every eval_every steps on the `val` windows (evaluation included: the same small cost
    for every backend); the median of `rounds` runs, after a throwaway run that compiles
    training and evaluation. Raises AssertionError if the target is not reached in max_steps."""
    warm = make_run()
    for _ in range(2):
        warm.step()
    warm.val_loss(*val)
    del warm
    seconds, steps, loss = [], 0, math.nan
    for _ in range(rounds):
        training = make_run()
        core.synchronize(device)
        start = time.perf_counter()
        while training.steps < max_steps:
            training.step()
            if training.steps % eval_every == 0:
                loss = training.val_loss(*val)  # .item() inside: waits for the device
                if loss <= target_loss:
                    break
        seconds.append(time.perf_counter() - start)
        steps = training.steps
        assert loss <= target_loss, f"validation loss {loss:.3f} after {max_steps} steps, short of {target_loss}"
    return {"seconds": statistics.median(seconds), "round_seconds": seconds, "steps": steps, "final_val_loss": loss}
