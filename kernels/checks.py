"""Input validation shared by every attention backend.

The dispatcher in kernels/__init__.py runs these checks once per call, for every backend,
so none of the backends repeats them. Each failure is one ValueError line that names the
argument and says what to pass instead.
"""

import math
import numbers

import torch

from .dropout import SEED_LIMIT


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_positive_finite(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def check_causal(causal) -> None:
    if not isinstance(causal, bool):  # not truthiness: causal="no" must not mean True
        raise ValueError(f"causal must be True or False, got {causal!r} ({type(causal).__name__})")


def check_options(*, scale, window, softcap, dropout_p, dropout_seed, deterministic=True) -> None:
    """Raise ValueError (one line) for an option no backend can honour."""
    if scale is not None and not _is_positive_finite(scale):
        raise ValueError(f"scale must be a finite number > 0, or None for 1/sqrt(head_dim); got {scale!r}")
    if window is not None and not (_is_int(window) and window >= 1):
        raise ValueError(
            f"window must be an int >= 1 (how many keys a query sees, itself included) or None for no window; "
            f"got {window!r}"
        )
    if softcap is not None and not _is_positive_finite(softcap):
        raise ValueError(f"softcap must be a finite number > 0 (Gemma 2 uses 50.0) or None for no cap; got {softcap!r}")
    if not (isinstance(dropout_p, numbers.Real) and not isinstance(dropout_p, bool) and 0 <= dropout_p < 1):
        raise ValueError(f"dropout_p must be a number in [0, 1) (0.0: no dropout); got {dropout_p!r}")
    if dropout_seed is not None and not (_is_int(dropout_seed) and 0 <= dropout_seed < SEED_LIMIT):
        raise ValueError(f"dropout_seed must be an int in [0, 2**32), or None to draw one; got {dropout_seed!r}")
    if not isinstance(deterministic, bool):  # not truthiness: deterministic="no" must not mean True
        raise ValueError(
            f"deterministic must be True (bit-identical gradients run to run) or False (allow a faster "
            f"backward whose dq varies in its last bits); got {deterministic!r} ({type(deterministic).__name__})"
        )


def _check_tensors(q, k, v, dims: int, layout: str, fix: str) -> None:
    """Tensors of `dims` dims, floating point, on one device with one dtype; v shaped like k."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != dims:
            raise ValueError(f"{name} must have {dims} dims {layout}, got shape {tuple(t.shape)}; {fix}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; move all of q, k, v to one device")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but q has {q.dtype}; cast q, k, v to one dtype")
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape (v's head_dim equal to k's), "
            f"got k {tuple(k.shape)} and v {tuple(v.shape)}"
        )


def _check_heads(q_heads: int, kv_heads: int, q_dim: int, k_dim: int) -> None:
    if q_heads % max(kv_heads, 1) or (kv_heads == 0 and q_heads > 0):
        raise ValueError(
            f"q has {q_heads} heads but k and v have {kv_heads}: q's head count must be a multiple of k's "
            "(grouped-query attention: query head h reads kv head h // (q_heads // kv_heads))"
        )
    if q_dim != k_dim:
        raise ValueError(f"q and k must share head_dim, got q {q_dim} and k {k_dim}")
    if q_dim == 0:
        raise ValueError("head_dim must be >= 1, got 0")


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> None:
    """Raise ValueError with a one-line message if q, k, v cannot be attended.

    Expected: q (batch, q_heads, q_len, head_dim); k and v (batch, kv_heads, kv_len,
    head_dim) with q_heads a multiple of kv_heads; all on one device with one floating dtype.
    """
    _check_tensors(q, k, v, 4, "(batch, heads, seq_len, head_dim)", "reshape with .view(B, T, H, D).transpose(1, 2)")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got q {q.shape[0]} and k {k.shape[0]}")
    _check_heads(q.shape[1], k.shape[1], q.shape[3], k.shape[3])
    check_causal(causal)
    if causal and q.shape[2] > k.shape[2]:
        raise ValueError(
            f"causal attention needs q_len <= kv_len (the mask is aligned bottom-right), "
            f"got q_len {q.shape[2]} > kv_len {k.shape[2]}; pass causal=False or a longer k/v"
        )


def _sequence_lengths(name: str, starts: list[int], total: int, tensor: str, max_seqlen: int) -> list[int]:
    """The lengths that cumulative lengths `starts` describe, checked against the tensor and max_seqlen."""
    if starts[0] != 0:
        raise ValueError(
            f"{name} must start at 0, got {starts[0]}; cu_seqlens are cumulative lengths [0, l0, l0+l1, ...]"
        )
    lengths = [end - start for start, end in zip(starts, starts[1:])]
    for s, length in enumerate(lengths):
        if length < 0:
            raise ValueError(
                f"{name} must be non-decreasing (cumulative lengths), but entry {s + 1} ({starts[s + 1]}) "
                f"is below entry {s} ({starts[s]})"
            )
    if starts[-1] != total:
        raise ValueError(
            f"{name} ends at {starts[-1]} but {tensor} holds {total} tokens ({tensor}.shape[0]); "
            "its last entry must be the total length"
        )
    longest = max(lengths, default=0)
    if not (_is_int(max_seqlen) and max_seqlen >= longest):
        raise ValueError(
            f"max_seqlen_{tensor} must be an int >= the longest sequence in {name} ({longest}), got {max_seqlen!r}"
        )
    return lengths


def check_varlen_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
) -> None:
    """Raise ValueError with a one-line message if packed sequences cannot be attended.

    Expected: q (total_q, q_heads, head_dim), k and v (total_k, kv_heads, head_dim);
    cu_seqlens_q/k int32 of batch + 1 entries on q's device, starting at 0, non-decreasing,
    ending at total_q/total_k; max_seqlen_q/k at least the longest sequence. Reads the
    cumulative lengths to the host (one small copy, a sync on a GPU).
    """
    _check_tensors(
        q, k, v, 3, "(total_tokens, heads, head_dim)", "pack the sequences back to back, e.g. x[padding_mask]"
    )
    _check_heads(q.shape[1], k.shape[1], q.shape[2], k.shape[2])
    check_causal(causal)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of int32, got {type(cu).__name__}")
        if cu.dtype != torch.int32:
            raise ValueError(
                f"{name} must be int32 (FlashAttention's convention), got {cu.dtype}; use .to(torch.int32)"
            )
        if cu.dim() != 1 or cu.numel() == 0:
            raise ValueError(
                f"{name} must be 1-D with batch + 1 entries [0, l0, l0+l1, ...], got shape {tuple(cu.shape)}"
            )
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {q.device}; move it to q's device")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must have one entry per sequence plus one each, "
            f"got {cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}"
        )
    starts = torch.cat([cu_seqlens_q, cu_seqlens_k]).tolist()  # one copy to the host for both
    n = cu_seqlens_q.numel()
    lengths_q = _sequence_lengths("cu_seqlens_q", starts[:n], q.shape[0], "q", max_seqlen_q)
    lengths_k = _sequence_lengths("cu_seqlens_k", starts[n:], k.shape[0], "k", max_seqlen_k)
    if causal:
        for s, (q_len, kv_len) in enumerate(zip(lengths_q, lengths_k)):
            if q_len > kv_len:
                raise ValueError(
                    f"causal attention needs each sequence's q length <= its k length (the mask is aligned "
                    f"bottom-right), but sequence {s} has {q_len} queries and {kv_len} keys; pass causal=False"
                )
