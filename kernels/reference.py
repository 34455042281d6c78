"""Attention written out in plain PyTorch: the readable ground truth.

Every other backend is tested against this one, and it does every feature of the API:

    scores  = scale * q k^T                          (B, Hq, Tq, Tk), one row per query
    scores  = softcap * tanh(scores / softcap)       optional: squash scores into (-softcap, softcap)
    scores  = where(visible, scores, -inf)           causal and sliding-window masks
    weights = softmax(scores)                        each row sums to 1
    weights = dropout(weights)                       optional: a seeded mask, see kernels/dropout.py
    out     = weights @ v                            (B, Hq, Tq, D)

It is exact in every dtype: scores, softmax and the weighted sum are computed in float32
(float64 inputs stay float64) and only the output is rounded to the inputs' dtype, so
float16 inputs whose dot products exceed float16's range (65,504) are still right. It
materializes the full (Tq, Tk) score matrix, so memory grows as O(T^2).
"""

import torch

from .dropout import keep_mask
from .varlen import by_sequence


def visible_keys(q_len: int, kv_len: int, *, causal: bool, window: int | None, device=None) -> torch.Tensor:
    """Bool mask of shape (q_len, kv_len), True where query i may attend to key j.

    Aligned bottom-right: the last query sits at the last key. With a KV cache, the q_len
    new queries are the *last* q_len positions of a sequence of kv_len tokens, so query i
    is at position i + (kv_len - q_len).
        causal:  it sees no key after its own position;
        window:  it sees no key `window` or more positions before its own, so with causal it
                 sees exactly `window` keys, itself included (fewer near the start).
    """
    query_pos = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)  # (q_len, 1)
    key_pos = torch.arange(kv_len, device=device)[None, :]  # (1, kv_len)
    visible = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    if causal:
        visible &= key_pos <= query_pos
    if window is not None:
        visible &= key_pos > query_pos - window
    return visible


def causal_mask(q_len: int, kv_len: int, device=None) -> torch.Tensor:
    """The causal mask alone: True where key j <= query i's position (see visible_keys)."""
    return visible_keys(q_len, kv_len, causal=True, window=None, device=device)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
    first_batch: int = 0,
    upcast: bool = True,
) -> torch.Tensor:
    """softmax(scale * q k^T + mask) v for q (B, Hq, Tq, D) and k, v (B, Hkv, Tk, D).

    Grouped-query attention: Hq is a multiple of Hkv, and query head h reads kv head
    h // (Hq // Hkv). first_batch: the index of q's first batch row in the dropout mask
    (varlen_attention passes each sequence's index). upcast=False computes every step in
    the inputs' dtype instead, as plain PyTorch code in that dtype would: not exact, it is
    what tests/tolerances.py measures a dtype's inherent error with.
    """
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    group = Hq // max(Hkv, 1)  # query heads per kv head (no heads at all: 0)
    dtype = q.dtype
    compute = torch.promote_types(dtype, torch.float32) if upcast else dtype  # float32 at least: exact for 16-bit
    # GQA without copies: split the query heads into (kv head, group) and let matmul broadcast
    # each kv head over its group. Query head h = kv_head * group + g, so h // group = kv_head.
    q = q.to(compute).view(B, Hkv, group, Tq, D)
    k = k.to(compute)[:, :, None]  # (B, Hkv, 1, Tk, D)
    v = v.to(compute)[:, :, None]

    scores = (q @ k.transpose(-2, -1)) * scale  # (B, Hkv, group, Tq, Tk): how well each query matches each key
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)  # Gemma 2's cap: large scores saturate smoothly
    if causal or window is not None:
        visible = visible_keys(Tq, Tk, causal=causal, window=window, device=q.device)
        scores = scores.masked_fill(~visible, float("-inf"))  # exp(-inf) = 0: hidden keys get no weight
    weights = torch.softmax(scores, dim=-1)  # each row sums to 1
    if dropout_p > 0:
        batch = torch.arange(first_batch, first_batch + B, device=q.device).view(B, 1, 1, 1)
        head = torch.arange(Hq, device=q.device).view(1, Hq, 1, 1)  # the query head
        query = torch.arange(Tq, device=q.device).view(1, 1, Tq, 1)
        key = torch.arange(Tk, device=q.device).view(1, 1, 1, Tk)
        kept = keep_mask(dropout_seed, batch, head, query, key, dropout_p).view(B, Hkv, group, Tq, Tk)
        weights = weights * kept / (1 - dropout_p)  # survivors scaled up: the expected output is unchanged
    out = weights @ v  # (B, Hkv, group, Tq, D): weighted average of the values
    return out.reshape(B, Hq, Tq, D).to(dtype)  # the one rounding to the inputs' dtype


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
    softcap: float | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
    upcast: bool = True,
) -> torch.Tensor:
    """attention() on each packed sequence alone (kernels/varlen.py); q (total_q, Hq, D) in, the same out.

    Sequence s is batch row s of the dropout mask. max_seqlen_q/k are not needed here (the
    fused kernels size their grids with them).
    """

    def attend(q, k, v, sequence):
        return attention(
            q,
            k,
            v,
            causal=causal,
            scale=scale,
            window=window,
            softcap=softcap,
            dropout_p=dropout_p,
            dropout_seed=dropout_seed,
            first_batch=sequence,
            upcast=upcast,
        )

    return by_sequence(attend, q, k, v, cu_seqlens_q, cu_seqlens_k)
