"""Q2: the shapes of q, k, v; what the 1/sqrt(d_k) scaling does; what other scoring functions cost.

    python docs/experiments/attention_scores.py    # ~1 min; writes docs/results/attention_scores.json

1. Shapes: d_v may differ from d_k, and k/v may have fewer heads than q (grouped-query attention).
2. Scaling: softmax entropy and score gradients for unit-variance q, k with and without the
   1/sqrt(d_k) factor; then the scores our GPT actually produces, at init and after training.
3. Scoring functions: time (forward + backward) and the largest intermediate tensor of dot-product
   (materialized and fused), cosine, negative squared distance and additive (Bahdanau) attention.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from common import median_seconds, save

import kernels
from gpt.model import GPT
from gpt.reverse import ReverseSettings, held_out_digits, reversal_examples, train_model, training_batches


def shapes() -> dict:
    B, H, T, d_k, d_v = 1, 4, 16, 32, 48
    q, k = torch.randn(B, H, T, d_k), torch.randn(B, H, T, d_k)
    v = torch.randn(B, H, T, d_v)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # scores (B, H, T, T), then @ v
    kv_heads = 1  # multi-query attention: every query head shares one key/value head
    q_gqa = torch.randn(B, H, T, d_k)
    k_mq, v_mq = torch.randn(B, kv_heads, T, d_k), torch.randn(B, kv_heads, T, d_k)
    out_mq = F.scaled_dot_product_attention(q_gqa, k_mq, v_mq, is_causal=True, enable_gqa=True)
    try:
        F.scaled_dot_product_attention(q, torch.randn(B, H, T, d_k // 2), v)
        mismatch = "no error"
    except RuntimeError as err:
        mismatch = str(err).splitlines()[0]
    return {
        "q": list(q.shape),
        "k": list(k.shape),
        "v": list(v.shape),
        "output": list(out.shape),
        "multi_query": {
            "q": list(q_gqa.shape),
            "k": list(k_mq.shape),
            "v": list(v_mq.shape),
            "output": list(out_mq.shape),
            "kv_cache_fraction": kv_heads / H,
        },
        "q_and_k_of_different_width": mismatch,
    }


def softmax_statistics(scores: torch.Tensor, v: torch.Tensor, upstream: torch.Tensor) -> dict:
    """Entropy (as a fraction of ln T), largest weight, and the gradient reaching the scores."""
    scores = scores.detach().requires_grad_()
    weights = torch.softmax(scores, dim=-1)
    (weights @ v * upstream).sum().backward()
    entropy = -(weights * weights.clamp_min(1e-30).log()).sum(-1)
    return {
        "score_std": scores.std().item(),
        "entropy_fraction": (entropy / math.log(scores.shape[-1])).mean().item(),
        "max_weight": weights.max(-1).values.mean().item(),
        "saturated_fraction": (weights.max(-1).values > 0.99).float().mean().item(),  # rows ~one-hot
        "score_grad_norm": scores.grad.norm(dim=-1).mean().item(),
    }


def scaling_with_unit_variance(n_keys: int = 64, n_queries: int = 512) -> list[dict]:
    """q, k ~ N(0, 1): q.k has variance d_k, so unscaled scores grow like sqrt(d_k)."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for d_k in (16, 64, 256, 1024):
        q = torch.randn(n_queries, d_k, generator=generator)
        k = torch.randn(n_keys, d_k, generator=generator)
        v = torch.randn(n_keys, 32, generator=generator)
        upstream = torch.randn(n_queries, 32, generator=generator)
        for name, scale in (("scaled", d_k**-0.5), ("unscaled", 1.0)):
            rows.append({"d_k": d_k, "scale": name, **softmax_statistics(q @ k.T * scale, v, upstream)})
    return rows


@torch.no_grad()
def model_scores(model: GPT, idx: torch.Tensor) -> list[dict]:
    """Score statistics of every layer's real q, k (as the model scales them) on inputs idx."""
    x = model.token_embedding(idx) + model.position_embedding(torch.arange(idx.shape[1]))
    rows = []
    B, T, C = x.shape
    for block in model.blocks:
        n_head = block.attn.n_head
        q, k, _ = block.attn.qkv(block.norm1(x)).view(B, T, 3, n_head, C // n_head).unbind(dim=2)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D)
        scores = q @ k.transpose(-2, -1) * (C // n_head) ** -0.5
        scores = scores.masked_fill(~kernels.reference.causal_mask(T, T), float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        entropy = -(weights * weights.clamp_min(1e-30).log()).sum(-1)  # (B, H, T)
        visible = torch.arange(1, T + 1)  # query t sees t + 1 keys: uniform attention has entropy ln(t + 1)
        rows.append(
            {
                "q_std": q.std().item(),
                "k_std": k.std().item(),
                "scaled_score_std": scores[scores.isfinite()].std().item(),
                "entropy_fraction_of_uniform": (entropy[..., 1:] / visible[1:].log()).mean().item(),
                "max_weight": weights.max(-1).values.mean().item(),
            }
        )
        x = block(x)
    return rows


def scores_at_init_and_after_training() -> dict:
    settings = ReverseSettings(steps=300)
    torch.manual_seed(settings.seed)
    model = GPT(settings.model_config())
    idx, _ = reversal_examples(held_out_digits(settings.n_digits)[:256])
    at_init = model_scores(model, idx)
    train_model(model, training_batches(settings), settings.steps, settings.lr)
    return {
        "model": "gpt.reverse model (2 layers, 2 heads, d_model 64, head dim 32), reversal task",
        "at_init": at_init,
        "after_300_steps": model_scores(model, idx),
    }


class AdditiveScore(nn.Module):
    """Bahdanau: score(q_i, k_j) = w . tanh(W_q q_i + W_k k_j): an MLP on every (i, j) pair."""

    def __init__(self, d_k: int, d_hidden: int):
        super().__init__()
        self.w_q = nn.Linear(d_k, d_hidden, bias=False)
        self.w_k = nn.Linear(d_k, d_hidden, bias=False)
        self.w = nn.Linear(d_hidden, 1, bias=False)

    def forward(self, q, k):
        pairs = torch.tanh(self.w_q(q)[..., :, None, :] + self.w_k(k)[..., None, :, :])  # (B, H, T, T, d_hidden)
        return self.w(pairs).squeeze(-1)  # (B, H, T, T)


def masked_softmax_attention(scores, v):
    T = scores.shape[-1]
    scores = scores.masked_fill(~kernels.reference.causal_mask(T, T), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def cosine_fused(q, k, v, temperature: float = 10.0):
    """Cosine similarity is a dot product of unit vectors: normalize, then any fused kernel works."""
    return F.scaled_dot_product_attention(
        F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, is_causal=True, scale=temperature
    )


def distance_fused(q, k, v):
    """-|q - k|^2 = 2 q.k - |k|^2 - |q|^2; |q|^2 is the same for every key of a query, so softmax
    ignores it, and 2 q.k - |k|^2 is the dot product of [2q, -1] and [k, |k|^2]: fused again."""
    q_aug = torch.cat([2 * q, -torch.ones_like(q[..., :1])], dim=-1)
    k_aug = torch.cat([k, (k * k).sum(-1, keepdim=True)], dim=-1)
    return F.scaled_dot_product_attention(q_aug, k_aug, v, is_causal=True, scale=q.shape[-1] ** -0.5)


def distance_materialized(q, k, v):
    return masked_softmax_attention(-(torch.cdist(q, k) ** 2) * q.shape[-1] ** -0.5, v)


def scoring_costs() -> dict:
    B, H, d = 1, 4, 32
    additive = AdditiveScore(d, d_hidden=d)
    # name -> (attention function, elements of its largest score-shaped intermediate as a function of T)
    variants = {
        "dot, materialized (reference)": (
            lambda q, k, v: kernels.attention(q, k, v, backend="reference"),
            lambda T: B * H * T * T,
        ),
        "dot, fused (sdpa)": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), None),
        "cosine, fused (sdpa)": (cosine_fused, None),
        "neg. sq. distance, fused (sdpa)": (distance_fused, None),
        "neg. sq. distance, materialized": (distance_materialized, lambda T: B * H * T * T),
        "additive (Bahdanau), materialized": (
            lambda q, k, v: masked_softmax_attention(additive(q, k), v),
            lambda T: B * H * T * T * d,
        ),
    }
    rows = []
    for T in (128, 256, 512, 1024):
        q, k, v = (torch.randn(B, H, T, d, requires_grad=True) for _ in range(3))
        for name, (attend, largest) in variants.items():
            row = {
                "T": T,
                "scoring": name,
                "largest_intermediate_MiB": largest(T) * 4 / 2**20 if largest else "none of size T x T",
            }
            if name.startswith("additive") and T > 512:
                row["skipped"] = "too large for this machine with autograd"
            else:
                row["forward_backward_ms"] = 1e3 * median_seconds(lambda: attend(q, k, v).sum().backward())
                print(f"T={T:5d} {name:36s} {row['forward_backward_ms']:8.1f} ms")
            rows.append(row)
    q, k, v = (torch.randn(B, H, 64, d) for _ in range(3))
    distance_gap = (distance_fused(q, k, v) - distance_materialized(q, k, v)).abs().max().item()
    return {"B": B, "H": H, "head_dim": d, "rows": rows, "distance_fused_vs_materialized_max_abs_diff": distance_gap}


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    record = {
        "shapes": shapes(),
        "unit_variance": scaling_with_unit_variance(),
        "gpt_scores": scores_at_init_and_after_training(),
        "scoring_costs": scoring_costs(),
    }
    for row in record["unit_variance"]:
        print(row)
    for when in ("at_init", "after_300_steps"):
        print(when, record["gpt_scores"][when])
    save("attention_scores", record)


if __name__ == "__main__":
    main()
