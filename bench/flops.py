"""FLOP counts and benchmark shapes, by the FlashAttention benchmark convention.

Attention (per call, q/k/v of shape (batch, heads, seqlen, head_dim)):

    forward   4 * B * H * T * T * D        two matmuls (q k^T and p v), 2 FLOPs per multiply-add
              halved when causal           only the lower triangle is useful work
    backward  2.5 * forward                five matmuls instead of two
    fwd+bwd   3.5 * forward

Every backend is credited with the same *useful* work, so TFLOP/s compare like with like
even for a backend (the reference) that computes the masked half anyway.

Shapes keep the number of tokens constant across sequence lengths (FlashAttention-2's
benchmark): batch = tokens // seqlen and heads = model_dim // head_dim, so each (seqlen,
head_dim) point moves the same amount of q/k/v data and only the attention pattern grows.
"""

from dataclasses import dataclass

PASSES = ("fwd", "fwd_bwd")
_PASS_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}

# FlashAttention-2 benchmark on GPU: 16k tokens, model dim 2048 (32 heads of 64, 16 heads of 128).
GPU_TOKENS = 16_384
GPU_MODEL_DIM = 2_048
# A 2-core CPU cannot do 16k tokens of O(T^2) reference attention in a few minutes.
CPU_TOKENS = 2_048
CPU_MODEL_DIM = 256


def attention_flops(
    batch: int, heads: int, seqlen_q: int, seqlen_k: int, head_dim: int, causal: bool = True, mode: str = "fwd"
) -> float:
    """Useful floating-point operations of one attention call; mode is fwd, bwd or fwd_bwd."""
    if mode not in _PASS_FACTOR:
        raise ValueError(f"mode must be one of {', '.join(_PASS_FACTOR)}, got {mode!r}")
    forward = 4.0 * batch * heads * seqlen_q * seqlen_k * head_dim
    if causal:
        forward /= 2
    return forward * _PASS_FACTOR[mode]


def tflops(flops: float, seconds: float) -> float:
    """Throughput in TFLOP/s (1e12 FLOP per second)."""
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    return flops / seconds / 1e12


@dataclass(frozen=True)
class AttentionShape:
    batch: int
    heads: int
    seqlen: int
    head_dim: int

    def as_dict(self) -> dict:
        return {"batch": self.batch, "heads": self.heads, "seqlen": self.seqlen, "head_dim": self.head_dim}


def constant_token_shape(
    seqlen: int, head_dim: int, tokens: int = GPU_TOKENS, model_dim: int = GPU_MODEL_DIM
) -> AttentionShape:
    """batch = tokens // seqlen (at least 1), heads = model_dim // head_dim (at least 1)."""
    if seqlen < 1 or head_dim < 1:
        raise ValueError(f"seqlen and head_dim must be positive, got {seqlen}, {head_dim}")
    return AttentionShape(
        batch=max(1, tokens // seqlen), heads=max(1, model_dim // head_dim), seqlen=seqlen, head_dim=head_dim
    )
