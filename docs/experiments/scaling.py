"""Q1: how forward and generation time grow with sequence length, for the transformer and a GRU.

    python docs/experiments/scaling.py      # ~1-3 min; writes docs/results/scaling.{json,png}

Forward: the model's body (the 4 blocks, no output layer) on one sequence of T tokens, split into
attention (the 4 kernels.attention calls, timed alone on the same shapes) and the rest. A 4-layer
GRU of the same width reads the same T vectors one position after another.
Generation: tokens/s of GPT.generate with and without the KV cache, from a 1-token prompt, and of
a GRU language model with the same embedding and (2,000-word) output layer.
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn as nn
from common import lm_config, median_seconds, save, save_figure

import kernels
from gpt.model import GPT, GPTConfig

LENGTHS = [64, 128, 256, 512, 1024, 2048]
GENERATE = [64, 128, 256, 512]


class GRULanguageModel(nn.Module):
    """Embedding -> 4-layer GRU -> Linear: the recurrent counterpart of the GPT."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.gru = nn.GRU(config.d_model, config.d_model, num_layers=config.n_layer, batch_first=True)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Each step feeds one token and the fixed-size state h: O(1) work and memory per token."""
        output, h = self.gru(self.embedding(idx))
        for _ in range(max_new_tokens):
            probs = torch.softmax(self.head(output[:, -1]), dim=-1)
            next_token = torch.multinomial(probs, 1)
            idx = torch.cat([idx, next_token], dim=1)
            output, h = self.gru(self.embedding(next_token), h)
        return idx


@torch.no_grad()
def forward_times(model: GPT, gru: nn.GRU, config: GPTConfig) -> list[dict]:
    rows = []
    head_dim = config.d_model // config.n_head
    for T in LENGTHS:
        idx = torch.randint(0, config.vocab_size, (1, T))
        x = torch.randn(1, T, config.d_model)
        q, k, v = (torch.randn(1, config.n_head, T, head_dim) for _ in range(3))
        body = median_seconds(lambda: model.hidden_states(idx))
        attention = config.n_layer * median_seconds(
            lambda: kernels.attention(q, k, v, causal=True, backend="reference")
        )
        recurrent = median_seconds(lambda: gru(x))
        d, L = config.d_model, config.n_layer
        rows.append(
            {
                "T": T,
                "body_ms": 1e3 * body,
                "attention_ms": 1e3 * attention,
                "rest_ms": 1e3 * (body - attention),
                "gru_ms": 1e3 * recurrent,
                # FLOPs of the matmuls: per layer, 24 d^2 per token (qkv, proj, 4x MLP) + 4 T d per token
                # (scores and weighted sum, all T x T computed, the masked half thrown away); GRU: 12 d^2.
                "body_gflops": L * (24 * d * d * T + 4 * T * T * d) / body / 1e9,
                "gru_gflops": L * 12 * d * d * T / recurrent / 1e9,
            }
        )
        print(
            f"T={T:5d} body {rows[-1]['body_ms']:8.1f} ms (attention {rows[-1]['attention_ms']:8.1f}) "
            f"gru {rows[-1]['gru_ms']:8.1f} ms"
        )
    return rows


def generation_rates(model: GPT, gru_lm: GRULanguageModel, config: GPTConfig) -> list[dict]:
    rows = []
    prompt = torch.zeros(1, 1, dtype=torch.long)
    for n in GENERATE:
        row = {"new_tokens": n}
        for name, generate in (
            ("cached", lambda: model.generate(prompt, n, use_cache=True)),
            ("uncached", lambda: model.generate(prompt, n, use_cache=False)),
            ("gru", lambda: gru_lm.generate(prompt, n)),
        ):
            row[f"{name}_tokens_per_s"] = n / median_seconds(generate, repeats=1 if name == "uncached" else 3)
        # What the cache holds at the end: k and v, (T, d_model) floats each, in every layer.
        row["kv_cache_bytes"] = 2 * config.n_layer * (n + 1) * config.d_model * 4
        rows.append(row)
        print(
            f"generate {n:4d}: cached {row['cached_tokens_per_s']:7.1f} tok/s, "
            f"uncached {row['uncached_tokens_per_s']:7.1f}, gru {row['gru_tokens_per_s']:7.1f}"
        )
    return rows


def plot(forward: list[dict], generation: list[dict]) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    lengths = [r["T"] for r in forward]
    for key, label in (
        ("body_ms", "transformer body (4 blocks)"),
        ("attention_ms", "  of which attention, O(T^2)"),
        ("rest_ms", "  of which the rest, O(T)"),
        ("gru_ms", "GRU, 4 layers"),
    ):
        left.loglog(lengths, [r[key] for r in forward], "o-", label=label)
    left.set(xlabel="sequence length T", ylabel="forward time (ms)", title="One forward pass over T tokens")
    left.legend(fontsize=8)
    n = [r["new_tokens"] for r in generation]
    for key, label in (("cached", "GPT with KV cache"), ("uncached", "GPT without cache"), ("gru", "GRU")):
        right.plot(n, [r[f"{key}_tokens_per_s"] for r in generation], "o-", label=label)
    right.set(xlabel="tokens generated", ylabel="tokens / s", title="Generation, 1-token prompt", yscale="log")
    right.legend(fontsize=8)
    save_figure(fig, "scaling")


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    # The shape of the default Shakespeare model (python -m gpt.train), with a 2,000-word full output
    # layer: the real 34,216-word one costs the same per token with or without the cache, and at
    # that size it dominates generation time and hides what the cache changes.
    config = lm_config(block_size=max(LENGTHS), d_model=128, attn="reference")
    model = GPT(config).eval()
    gru_lm = GRULanguageModel(config).eval()
    body_params = sum(p.numel() for p in model.blocks.parameters())
    gru_params = sum(p.numel() for p in gru_lm.gru.parameters())
    print(f"parameters: transformer blocks {body_params:,}, GRU {gru_params:,}")
    forward = forward_times(model, gru_lm.gru, config)
    generation = generation_rates(model, gru_lm, config)
    plot(forward, generation)
    save(
        "scaling",
        {
            "threads": 1,
            "config": {name: getattr(config, name) for name in ("n_layer", "n_head", "d_model", "vocab_size")},
            "transformer_block_parameters": body_params,
            "gru_parameters": gru_params,
            "forward": forward,
            "generation": generation,
        },
    )


if __name__ == "__main__":
    main()
