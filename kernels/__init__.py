"""Attention behind one function, with interchangeable backends.

    out = kernels.attention(q, k, v, causal=True, backend="triton")
    out = kernels.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)

attention: q is (batch, q_heads, q_len, head_dim); k and v are (batch, kv_heads, kv_len,
head_dim), q_heads a multiple of kv_heads (grouped-query attention). varlen_attention takes
sequences packed back to back, as flash_attn_varlen_func does: q (total_q, q_heads,
head_dim), k and v (total_k, kv_heads, head_dim), int32 cumulative lengths. Both take the
same options: causal, scale, window, softcap, dropout_p, dropout_seed and deterministic (see
attention).

Backends:
    reference  plain PyTorch, every feature (runs anywhere, O(T^2) memory): the ground truth
    sdpa       torch.nn.functional.scaled_dot_product_attention: all but softcap and dropout
    triton     our fused FlashAttention-2-style kernels (interpreted, slowly, without CUDA):
               every feature, head dims that are multiples of 8 up to 256
    auto       the first backend that can serve the call, in the order triton, sdpa,
               reference on CUDA, and sdpa, reference elsewhere (sdpa: same math as
               reference, several times faster on a CPU)

This module is the one place that picks a backend: it validates every call once
(kernels/checks.py), refuses what the chosen backend cannot do with one line naming the
argument and a backend that can, and passes each backend only the options it supports.
"""

import importlib

import torch

from . import reference, sdpa
from .checks import check_attention_inputs, check_options, check_varlen_inputs
from .dropout import draw_seed

BACKENDS = ("reference", "sdpa", "triton")
BACKEND_CHOICES = (*BACKENDS, "auto")  # what a --attn flag accepts

# What each backend does beyond plain attention (as many kv heads as query heads, causal or not,
# any scale). Whatever a call needs that its backend lacks is refused before it runs.
FEATURES = {
    "reference": frozenset({"gqa", "window", "softcap", "dropout", "varlen"}),
    "sdpa": frozenset({"gqa", "window", "varlen"}),
    "triton": frozenset({"gqa", "window", "softcap", "dropout", "varlen"}),
}
# How an error names the argument behind each feature.
_FEATURE_ARGUMENTS = {
    "gqa": "grouped-query attention (k and v with fewer heads than q)",
    "window": "window=",
    "softcap": "softcap=",
    "dropout": "dropout_p > 0",
    "varlen": "varlen_attention",
}


def _triton_attention(*args, **options):
    # Imported on first use: the module decides at import time whether Triton must run
    # through its CPU interpreter, and importing Triton is slow.
    from . import triton_attention

    return triton_attention.attention(*args, **options)


def _triton_varlen_attention(*args, **options):
    from . import triton_attention

    return triton_attention.varlen_attention(*args, **options)


_IMPLEMENTATIONS = {
    "reference": reference.attention,
    "sdpa": sdpa.attention,
    "triton": _triton_attention,
}
_VARLEN_IMPLEMENTATIONS = {
    "reference": reference.varlen_attention,
    "sdpa": sdpa.varlen_attention,
    "triton": _triton_varlen_attention,
}


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """Turn "auto" into a concrete backend name for plain attention on `device`; reject unknown names."""
    if backend == "auto":
        return "triton" if torch.device(device).type == "cuda" else "sdpa"
    if backend not in _IMPLEMENTATIONS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKEND_CHOICES)}")
    return backend


def _select_backend(backend: str, device: torch.device, needs: set[str]) -> str:
    """The backend that serves a call needing `needs`: the named one if it can, else a one-line error;
    for "auto", the first that can in its order (see the module docstring)."""
    name = resolve_backend(backend, device)
    if backend == "auto":
        order = ("triton", "sdpa", "reference") if name == "triton" else ("sdpa", "reference")
        return next(candidate for candidate in order if needs <= FEATURES[candidate])
    missing = sorted(needs - FEATURES[name])
    if missing:
        alternatives = " or ".join(repr(b) for b in BACKENDS if needs <= FEATURES[b])
        raise ValueError(
            f"{_FEATURE_ARGUMENTS[missing[0]]} is not supported by the {name} backend; use backend={alternatives}"
        )
    return name


def _options(q, k, scale, window, softcap, dropout_p, dropout_seed, deterministic) -> tuple[dict, set[str]]:
    """The validated options as keyword arguments (only those in use) and the features the call needs.
    (deterministic is checked here and passed on by _for_backend: only the triton backend takes it.)"""
    check_options(
        scale=scale,
        window=window,
        softcap=softcap,
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
        deterministic=deterministic,
    )
    options = {"scale": q.shape[-1] ** -0.5 if scale is None else float(scale)}
    needs = {"gqa"} if q.shape[1] != k.shape[1] else set()  # heads are dim 1 of dense and packed inputs
    if window is not None:
        options["window"] = int(window)
        needs.add("window")
    if softcap is not None:
        options["softcap"] = float(softcap)
        needs.add("softcap")
    if dropout_p > 0:
        options["dropout_p"] = float(dropout_p)
        options["dropout_seed"] = draw_seed() if dropout_seed is None else int(dropout_seed)
        needs.add("dropout")
    return options, needs


def _for_backend(name: str, options: dict, deterministic: bool) -> dict:
    """The options `name` takes: deterministic=False reaches only the triton backend, whose
    backward it switches; reference is deterministic, sdpa follows torch.use_deterministic_algorithms."""
    return {**options, "deterministic": False} if name == "triton" and not deterministic else options


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


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    deterministic: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention; returns (batch, q_heads, q_len, head_dim) in q's dtype.

    q (B, Hq, Tq, D); k, v (B, Hkv, Tk, D) with Hq a multiple of Hkv: query head h reads kv
    head h // (Hq // Hkv), and nothing is copied (GQA; Hkv = 1 is multi-query attention).
    Query i sits at position i + Tk - Tq (bottom-right alignment: the last query is the
    last key, as when decoding against a KV cache).

    causal:  query i sees no key after its position (needs Tq <= Tk).
    scale:   multiplies q k^T; defaults to 1/sqrt(D).
    window:  query i sees no key `window` or more positions before its own: with causal,
             the `window` keys ending at itself (transformers' sliding_window,
             FlashAttention's window_size=(window - 1, 0)); without causal, also every later key.
    softcap: scores become softcap * tanh(scale * q k^T / softcap) before masking (Gemma 2).
    dropout_p: each attention probability is zeroed with this probability and the rest
             scaled by 1 / (1 - dropout_p), as in training; 0.0 (the default) in evaluation.
    dropout_seed: fixes the dropout mask, a pure function of (seed, batch, head, query, key)
             (kernels/dropout.py), so every backend that supports dropout drops the same
             probabilities; None draws a seed from PyTorch's default generator (torch.manual_seed
             repeats it).
    deterministic: True (the default): the gradients are bit-identical run to run. False lets
             the triton backend's backward take its single pass (LaunchConfig.dq_atomic), which
             adds dQ up with atomic adds: 5 matrix products per tile pair instead of 7, and dq's
             last bits then vary from run to run on a GPU (dk, dv and the output do not). The
             reference backend ignores it (always deterministic); so does sdpa, whose CUDA kernels
             follow PyTorch's own switch, torch.use_deterministic_algorithms.
    backend: "reference", "sdpa", "triton" or "auto" (see the module docstring).
    """
    name = resolve_backend(backend, q.device if isinstance(q, torch.Tensor) else "cpu")
    check_attention_inputs(q, k, v, causal)
    options, needs = _options(q, k, scale, window, softcap, dropout_p, dropout_seed, deterministic)
    if needs:  # plain calls (the model's) skip the search
        name = _select_backend(backend, q.device, needs)
    return _IMPLEMENTATIONS[name](q, k, v, causal=causal, **_for_backend(name, options, deterministic))


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = True,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    deterministic: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention over sequences packed back to back; returns (total_q, q_heads, head_dim).

    Sequence s is q[cu_seqlens_q[s]:cu_seqlens_q[s + 1]] (total_q, Hq, D) against
    k, v[cu_seqlens_k[s]:cu_seqlens_k[s + 1]] (total_k, Hkv, D). cu_seqlens_q/k are int32,
    batch + 1 entries on q's device: [0, l0, l0 + l1, ..., total]. max_seqlen_q/k are ints
    at least the longest sequence (flash_attn_varlen_func's arguments). No sequence sees
    another; masks align bottom-right within each sequence (with causal, each sequence needs
    no more queries than keys). Empty and length-1 sequences are fine; a sequence with
    queries but no keys (causal=False) gives zeros. Sequence s is batch row s of the dropout
    mask, and positions count from each sequence's start. Options as in `attention`.

    Validating cu_seqlens reads them to the host: one small copy per call (a sync on a GPU).
    """
    name = resolve_backend(backend, q.device if isinstance(q, torch.Tensor) else "cpu")
    check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal)
    options, needs = _options(q, k, scale, window, softcap, dropout_p, dropout_seed, deterministic)
    name = _select_backend(backend, q.device, needs | {"varlen"})
    options = _for_backend(name, options, deterministic)
    return _VARLEN_IMPLEMENTATIONS[name](
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal, **options
    )
