"""Attention written out in plain PyTorch: the readable ground truth.

Every other backend is tested against this one (computed in float64). It is exact in
every dtype: scores, softmax and the weighted sum are computed in float32 (float64 inputs
stay float64) and only the output is rounded to the inputs' dtype, so float16 inputs whose
dot products exceed float16's range (65,504) are still right. It materializes the full
(q_len, kv_len) score matrix, so memory grows as O(T^2).
"""

import torch


def causal_mask(q_len: int, kv_len: int, device=None) -> torch.Tensor:
    """Bool mask of shape (q_len, kv_len), True where query i may attend to key j.

    The mask is aligned bottom-right: the last query sits at the last key. With a
    KV cache, the q_len new queries are the *last* q_len positions of a sequence
    of kv_len tokens, so query i is at absolute position i + (kv_len - q_len) and
    may see every key up to and including that position.
    """
    query_pos = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)  # (q_len, 1)
    key_pos = torch.arange(kv_len, device=device)[None, :]  # (1, kv_len)
    return key_pos <= query_pos


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, upcast: bool = True
) -> torch.Tensor:
    """softmax(scale * q k^T + mask) v, for q (B, H, Tq, D) and k, v (B, H, Tk, D).

    upcast=False computes every step in the inputs' dtype instead, as plain PyTorch code in
    that dtype would: not exact, it is what tests/tolerances.py measures a dtype's inherent error with.
    """
    dtype = q.dtype
    compute = torch.promote_types(dtype, torch.float32) if upcast else dtype  # float32 at least: exact for 16-bit
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, Tq, Tk): how much each query matches each key
    if causal:
        allowed = causal_mask(q.shape[-2], k.shape[-2], device=q.device)
        scores = scores.masked_fill(~allowed, float("-inf"))  # exp(-inf) = 0: future keys get no weight
    weights = torch.softmax(scores, dim=-1)  # each row sums to 1
    out = weights @ v  # (B, H, Tq, D): weighted average of the values
    return out.to(dtype)  # the one rounding to the inputs' dtype
