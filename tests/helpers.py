"""Helpers shared by the test modules: a synthetic corpus, the flags of a tiny run, running
`python -m ...` in a subprocess; and for the attention tests, random q/k/v (dense and packed)
and an independent float64 oracle of every attention feature."""

import itertools
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gpt.data import DATA_ENV_VAR

REPO = Path(__file__).resolve().parents[1]
WORDS = (
    "the king queen lord my good sir and of to love thou art thy heart death night day "
    "shall not be what is come go speak"
).split()


def write_corpus(path: Path, n_lines: int = 3000, seed: int = 0) -> Path:
    """A fake Project Gutenberg file: random sentences between the START and END marker lines."""
    rng = random.Random(seed)
    lines = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))).capitalize() + rng.choice(".,!?")
        for _ in range(n_lines)
    ]
    path.write_text(
        "The Project Gutenberg eBook\n"
        "*** START OF THE PROJECT GUTENBERG EBOOK THE COMPLETE WORKS OF WILLIAM SHAKESPEARE ***\n"
        + "\n".join(lines)
        + "\n*** END OF THE PROJECT GUTENBERG EBOOK ***\n",
        encoding="utf-8",
    )
    return path


def tiny_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    """Flags of a tiny run (~20k parameters, milliseconds per step) on the synthetic corpus."""
    return [
        "--data",
        str(corpus),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--head",
        "full",
        "--n-layer",
        "1",
        "--n-head",
        "2",
        "--d-model",
        "32",
        "--seq-len",
        "16",
        "--batch-size",
        "8",
        "--warmup",
        "2",
        "--log-interval",
        "2",
        "--eval-interval",
        "4",
        "--eval-windows",
        "16",
        "--ckpt-interval",
        "4",
        *extra,
    ]


def run_module(
    module: str, args: list[str], env: dict | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """`python -m module args` from the repository root, on one CPU thread (the machine may be shared)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def start_module(module: str, args: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def wait_for(condition, timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def metrics(out: Path) -> list[dict]:
    """Every line of out/metrics.jsonl, parsed as standard JSON; fails if any line does not parse,
    or holds NaN or Infinity (which Python's json accepts but JSON does not)."""

    def refuse(name: str):
        raise AssertionError(f"{name} in metrics.jsonl is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in (out / "metrics.jsonl").read_text().splitlines()]


def error_line(stderr: str, *fragments: str) -> str:
    """The one line a failed program wrote to stderr, asserting that there is exactly one, that
    it starts with "error: " on a line of its own, that it holds every fragment, and that no
    traceback came with it. Only a progress bar may come before it (its lines show the rate,
    "step/s"; tqdm ends its line when it closes)."""
    lines = [line for line in stderr.split("\n") if line.strip()]
    assert lines and lines[-1].startswith("error: "), stderr
    assert all("step/s" in line for line in lines[:-1]), stderr  # progress bars only
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])
    return lines[-1]


def assert_same_losses(a: list[dict], b: list[dict], rel: float = 1e-6) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("train_loss", "val_loss"):
            assert (ra[key] is None) == (rb[key] is None), (ra, rb)
            if ra[key] is not None:
                assert ra[key] == pytest.approx(rb[key], rel=rel, abs=1e-7), (key, ra, rb)


def shakespeare_path() -> Path:
    """The real Complete Works: $GPT_SHAKESPEARE, else ../shared/data/shakespeare.txt beside the
    repository. Without either the calling test fails (not skips): CI must run it."""
    for candidate in (os.environ.get(DATA_ENV_VAR), REPO.parent / "shared" / "data" / "shakespeare.txt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    pytest.fail(f"the Complete Works are needed: set {DATA_ENV_VAR}=/path/to/pg100.txt (Project Gutenberg eBook #100)")


# ---------------------------------------------------------------------------------------
# Attention: random inputs and an independent float64 oracle
# ---------------------------------------------------------------------------------------


def make_qkv(
    batch: int,
    heads: int,
    q_len: int,
    kv_len: int,
    head_dim: int,
    *,
    kv_heads: int | None = None,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    layout: str = "contiguous",
    scale_inputs: float = 1.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (batch, heads, q_len, head_dim), k and v (batch, kv_heads, kv_len, head_dim), standard
    normal times scale_inputs (drawn in float32, then cast), in one of several memory layouts.

    contiguous  three separate tensors
    fused_qkv   slices of one (batch, T, (heads + 2 * kv_heads) * head_dim) projection, as a
                GPT block makes them: strided views, last-dim stride 1 (needs q_len == kv_len)
    d_strided   head_dim is not the innermost dimension (last-dim stride != 1)
    """
    kv_heads = heads if kv_heads is None else kv_heads
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return (torch.randn(*shape, generator=g) * scale_inputs).to(dtype).to(device)

    if layout == "contiguous":
        return randn(batch, heads, q_len, head_dim), *(randn(batch, kv_heads, kv_len, head_dim) for _ in "kv")
    if layout == "fused_qkv":
        assert q_len == kv_len, "a fused projection makes as many queries as keys"
        qkv = randn(batch, q_len, (heads + 2 * kv_heads) * head_dim).view(batch, q_len, -1, head_dim)
        q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=2)  # each (batch, T, h, head_dim)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if layout == "d_strided":
        q = randn(batch, heads, head_dim, q_len).transpose(2, 3)
        return q, *(randn(batch, kv_heads, head_dim, kv_len).transpose(2, 3) for _ in "kv")
    raise ValueError(f"unknown layout {layout!r}")


def make_varlen(
    seqlens_q: list[int],
    seqlens_k: list[int],
    heads: int,
    head_dim: int,
    *,
    kv_heads: int | None = None,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    """Packed sequences for kernels.varlen_attention: q (sum(seqlens_q), heads, head_dim), k and v
    (sum(seqlens_k), kv_heads, head_dim), int32 cu_seqlens_q and cu_seqlens_k, max_seqlen_q, max_seqlen_k."""
    kv_heads = heads if kv_heads is None else kv_heads
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(seqlens_q), heads, head_dim, generator=g).to(dtype).to(device)
    k, v = (torch.randn(sum(seqlens_k), kv_heads, head_dim, generator=g).to(dtype).to(device) for _ in "kv")

    def cumulative(lengths):
        return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)

    return q, k, v, cumulative(seqlens_q), cumulative(seqlens_k), max(seqlens_q, default=0), max(seqlens_k, default=0)


def dropout_bits_oracle(seed: int, batch: int, head: int, query: int, key: int) -> int:
    """The 32-bit hash that decides one attention probability's dropout, from the definition in
    kernels/dropout.py written again with Python integers (not a call into the code under test)."""

    def mix(x: int) -> int:
        x = (((x >> 16) ^ x) * 0x45D9F3B) % 2**32
        x = (((x >> 16) ^ x) * 0x45D9F3B) % 2**32
        return (x >> 16) ^ x

    bits = mix(seed)
    for index in (batch, head, query, key):
        bits = mix(bits ^ index)
    return bits


def dropout_kept_oracle(seed: int, batch: int, head: int, query: int, key: int, p: float) -> bool:
    """Whether that probability survives: dropped when its hash is below a fraction p of 2**32."""
    return dropout_bits_oracle(seed, batch, head, query, key) >= math.floor(p * 2**32)


def attention_oracle(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
    first_batch: int = 0,
) -> torch.Tensor:
    """Attention in float64, one (batch, head, query) row at a time, straight from the definitions.

    q (B, Hq, Tq, D), k and v (B, Hkv, Tk, D). For each query: its position, the list of
    keys it may see (causal: none after it; window: none `window` or more before it), their
    scores, the softcap, a softmax, dropout decided key by key, the weighted sum. Differentiable
    (autograd through the loop), so gradients come from it too. Shares no code with kernels/.
    """
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    q, k, v = q.double(), k.double(), v.double()
    rows = []
    for b in range(B):
        for h in range(Hq):
            kv_head = h * Hkv // Hq  # = h // (Hq // Hkv)
            for i in range(Tq):
                position = i + Tk - Tq
                keys = [
                    j for j in range(Tk) if (not causal or j <= position) and (window is None or j > position - window)
                ]
                if not keys:  # nothing to attend to: zeros
                    rows.append(q.new_zeros(v.shape[-1]))
                    continue
                scores = torch.stack([scale * torch.dot(q[b, h, i], k[b, kv_head, j]) for j in keys])
                if softcap is not None:
                    scores = softcap * torch.tanh(scores / softcap)
                weights = torch.softmax(scores, dim=0)
                if dropout_p > 0:
                    kept = [dropout_kept_oracle(dropout_seed, first_batch + b, h, i, j, dropout_p) for j in keys]
                    weights = weights * torch.tensor(kept, dtype=torch.float64, device=q.device) / (1 - dropout_p)
                rows.append(sum(w * v[b, kv_head, j] for w, j in zip(weights, keys)))
    return torch.stack(rows).view(B, Hq, Tq, v.shape[-1]) if rows else q.new_zeros(B, Hq, Tq, v.shape[-1])


def varlen_attention_oracle(q, k, v, cu_seqlens_q, cu_seqlens_k, **options) -> torch.Tensor:
    """attention_oracle on each packed sequence, sequence s as batch row s; returns (total_q, Hq, D) float64."""
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs = []
    for s in range(len(starts_q) - 1):
        q_s = q[starts_q[s] : starts_q[s + 1]].transpose(0, 1)[None]  # (1, Hq, Tq_s, D)
        k_s, v_s = (t[starts_k[s] : starts_k[s + 1]].transpose(0, 1)[None] for t in (k, v))
        outs.append(attention_oracle(q_s, k_s, v_s, first_batch=s, **options)[0].transpose(0, 1))
    return torch.cat(outs) if outs else q.double().new_zeros(q.shape)
