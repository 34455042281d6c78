"""Causal attention behind one function, with interchangeable backends.

    out = kernels.attention(q, k, v, causal=True, backend="triton")

q is (batch, heads, q_len, head_dim); k and v are (batch, heads, kv_len, head_dim).
Backends:
    reference  plain PyTorch with an explicit mask (runs anywhere, O(T^2) memory)
    sdpa       torch.nn.functional.scaled_dot_product_attention
    triton     our fused FlashAttention-2-style kernel (interpreted, slowly, without CUDA)
    auto       triton on CUDA, sdpa elsewhere (same math as reference, several times faster on a CPU)
"""

import importlib

import torch

from . import reference, sdpa
from .checks import check_attention_inputs

BACKENDS = ("reference", "sdpa", "triton")
BACKEND_CHOICES = (*BACKENDS, "auto")  # what a --attn flag accepts


def _triton_attention(q, k, v, *, causal, scale):
    # Imported on first use: the module decides at import time whether Triton must run
    # through its CPU interpreter, and importing Triton is slow.
    from . import triton_attention

    return triton_attention.attention(q, k, v, causal=causal, scale=scale)


_IMPLEMENTATIONS = {
    "reference": reference.attention,
    "sdpa": sdpa.attention,
    "triton": _triton_attention,
}


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """Turn "auto" into a concrete backend name for `device`; reject unknown names."""
    if backend == "auto":
        return "triton" if torch.device(device).type == "cuda" else "sdpa"
    if backend not in _IMPLEMENTATIONS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKEND_CHOICES)}")
    return backend


def unavailable_reason(backend: str, device: torch.device | str = "cpu") -> str | None:
    """None if `backend` can run on `device` here; otherwise one line, starting with the
    backend's name, saying why and what to use instead.

    The one place that knows whether a backend loads: every CLI and the benchmarks ask it,
    so a missing or broken Triton fails up front, not with a traceback at the first forward.
    """
    name = resolve_backend(backend, device)
    if name != "triton":
        return None
    if torch.device(device).type not in ("cuda", "cpu"):
        return f"triton runs on cuda (or cpu through Triton's interpreter), not {device}; use sdpa"
    try:
        importlib.import_module("kernels.triton_attention")
    except Exception as err:  # ImportError, or Triton failing to initialize: any reason means "not here"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"triton is unavailable ({reason}); use sdpa or reference"
    return None


def available(backend: str, device: torch.device | str = "cpu") -> bool:
    """Whether `backend` can run on `device` here (see unavailable_reason for why not)."""
    return unavailable_reason(backend, device) is None


def attention(q, k, v, *, causal: bool = True, scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Scaled dot-product attention; returns (batch, heads, q_len, head_dim).

    causal: query i sees keys j <= i + kv_len - q_len (bottom-right aligned).
    scale:  multiplies q k^T; defaults to 1/sqrt(head_dim).
    """
    name = resolve_backend(backend, q.device if isinstance(q, torch.Tensor) else "cpu")
    check_attention_inputs(q, k, v, causal)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return _IMPLEMENTATIONS[name](q, k, v, causal=causal, scale=float(scale))
