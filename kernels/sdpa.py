"""PyTorch's fused attention, `torch.nn.functional.scaled_dot_product_attention`.

This is the peer our Triton kernel must beat. On CUDA it dispatches to
FlashAttention-2, memory-efficient attention or cuDNN; on CPU to a fused C++ kernel.

What SDPA can express, this backend does: grouped-query attention (enable_gqa: no copies
of k and v), causal and sliding-window masks (an explicit bool mask where SDPA's own
is_causal, aligned top-left, would differ from ours) and packed sequences (one call per
sequence, kernels/varlen.py). SDPA has no score cap, and its dropout draws from PyTorch's
random stream, not from the seeded mask that every other backend reproduces
(kernels/dropout.py), so softcap and dropout_p are refused by the dispatcher
(kernels/__init__.py) before a call gets here.
"""

import torch
import torch.nn.functional as F

from .reference import visible_keys
from .varlen import by_sequence


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, window: int | None = None
) -> torch.Tensor:
    """q (B, Hq, Tq, D), k and v (B, Hkv, Tk, D) -> (B, Hq, Tq, D)."""
    gqa = q.shape[1] != k.shape[1]
    if window is None and (not causal or q.shape[-2] == k.shape[-2]):
        # No mask, or the square causal one, where top-left and bottom-right alignment agree.
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    mask = visible_keys(q.shape[-2], k.shape[-2], causal=causal, window=window, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """attention() on each packed sequence (kernels/varlen.py); q (total_q, Hq, D) -> (total_q, Hq, D)."""

    def attend(q, k, v, sequence):
        return attention(q, k, v, causal=causal, scale=scale, window=window)

    return by_sequence(attend, q, k, v, cu_seqlens_q, cu_seqlens_k)
