"""PyTorch's fused attention, `torch.nn.functional.scaled_dot_product_attention`.

This is the peer our Triton kernel must beat. On CUDA it dispatches to
FlashAttention-2, memory-efficient attention or cuDNN; on CPU to a fused C++ kernel.
"""

import torch
import torch.nn.functional as F

from .reference import causal_mask


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float) -> torch.Tensor:
    if causal and q.shape[-2] != k.shape[-2]:
        # SDPA's is_causal aligns the mask top-left; ours is bottom-right (KV-cache decoding),
        # so pass the mask explicitly in that case.
        mask = causal_mask(q.shape[-2], k.shape[-2], device=q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
