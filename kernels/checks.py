"""Input validation shared by every attention backend.

Each backend trusts that `check_attention_inputs` ran first (the dispatcher in
`kernels/__init__.py` calls it), so none of them repeats these checks.
"""

import torch


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> None:
    """Raise ValueError with a one-line message if q, k, v cannot be attended.

    Expected: q (batch, heads, q_len, head_dim); k and v (batch, heads, kv_len, head_dim),
    all on one device with one floating dtype.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have 4 dims (batch, heads, seq_len, head_dim), got shape {tuple(t.shape)}; "
                "reshape with .view(B, T, H, D).transpose(1, 2)"
            )
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; move all of q, k, v to one device")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but q has {q.dtype}; cast q, k, v to one dtype")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1]:
        raise ValueError(f"q and k must agree in (batch, heads), got q {tuple(q.shape[:2])} and k {tuple(k.shape[:2])}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must share head_dim, got q {q.shape[3]} and k {k.shape[3]}")
    if causal and q.shape[2] > k.shape[2]:
        raise ValueError(
            f"causal attention needs q_len <= kv_len (the mask is aligned bottom-right), "
            f"got q_len {q.shape[2]} > kv_len {k.shape[2]}; pass causal=False or a longer k/v"
        )
