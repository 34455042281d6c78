"""Q4: an 8-block model with and without residual connections and LayerNorm.

    python docs/experiments/residual.py    # ~2-3 min; writes docs/results/residual.{json,png}

Four Shakespeare models (8 blocks, d_model 64, 2,000-word vocabulary), same seed, data and
learning rate; GPTConfig.residual=False makes each block x = f(x) instead of x = x + f(x), and
layer_norm=False removes every LayerNorm. Recorded: the training loss of every step, the
held-out loss at the end, each block's gradient norm before clipping, at initialization (step 0)
and averaged over the first 50 steps, and at initialization how much the last position's final
hidden state depends on the last token.
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from common import (
    block_grad_norms,
    lm_batches,
    lm_config,
    loss_on,
    moving_average,
    save,
    save_figure,
    shakespeare,
    unigram_loss,
)

from gpt.model import GPT
from gpt.reverse import train_model

N_LAYER, STEPS, BATCH_SIZE, SEQ_LEN, LR, EARLY = 8, 300, 8, 64, 2e-3, 50
VARIANTS = {
    "residual + LayerNorm (standard)": dict(residual=True, layer_norm=True),
    "residual, no LayerNorm": dict(residual=True, layer_norm=False),
    "no residual, LayerNorm": dict(residual=False, layer_norm=True),
    "no residual, no LayerNorm": dict(residual=False, layer_norm=False),
}


@torch.no_grad()
def last_token_influence(model: GPT, windows: torch.Tensor) -> dict:
    """How much the final hidden state of the last position moves when only the last token changes."""
    changed = windows.clone()
    changed[:, -1] = (changed[:, -1] + 1) % model.config.vocab_size
    before, after = model.hidden_states(windows)[:, -1], model.hidden_states(changed)[:, -1]
    return {
        "hidden_norm": before.norm(dim=-1).mean().item(),
        "change_norm": (after - before).norm(dim=-1).mean().item(),
    }


def run_variant(training, held_out, overrides: dict) -> dict:
    torch.manual_seed(0)
    model = GPT(lm_config(n_layer=N_LAYER, block_size=SEQ_LEN, **overrides))
    influence_at_init = last_token_influence(model.eval(), held_out[0])
    grad_norms = []

    def record(step: int, model: GPT) -> None:
        if step < EARLY:
            grad_norms.append(block_grad_norms(model) + [model.token_embedding.weight.grad.norm().item()])

    losses = train_model(model, lm_batches(training, BATCH_SIZE), STEPS, LR, after_backward=record)
    early = [sum(column) / EARLY for column in zip(*grad_norms)]
    return {
        "last_token_influence_at_init": influence_at_init,
        "block_grad_norm_at_init": grad_norms[0][:-1],
        "embedding_grad_norm_at_init": grad_norms[0][-1],
        f"block_grad_norm_mean_first_{EARLY}_steps": early[:-1],
        f"embedding_grad_norm_mean_first_{EARLY}_steps": early[-1],
        "train_loss_last_50": sum(losses[-50:]) / 50,
        "held_out_loss": loss_on(model, *held_out),
        "train_losses": losses,
    }


def plot(results: dict) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, result in results.items():
        left.plot(moving_average(result["train_losses"]), label=name)
        right.semilogy(range(1, N_LAYER + 1), result["block_grad_norm_at_init"], "o-", label=name)
    left.set(xlabel="step", ylabel="training loss (20-step mean)", title=f"{N_LAYER} blocks, d_model 64")
    right.set(
        xlabel="block (1 = nearest the input)",
        ylabel="gradient norm of the block's parameters",
        title="Gradient reaching each block at initialization",
    )
    left.legend(fontsize=8)
    save_figure(fig, "residual")


def main() -> None:
    torch.set_num_threads(1)
    training, held_out = shakespeare(SEQ_LEN)
    results = {}
    for name, overrides in VARIANTS.items():
        results[name] = run_variant(training, held_out, overrides)
        summary = {k: v for k, v in results[name].items() if k != "train_losses"}
        print(name, summary)
    plot(results)
    save(
        "residual",
        {
            "n_layer": N_LAYER,
            "steps": STEPS,
            "batch_size": BATCH_SIZE,
            "seq_len": SEQ_LEN,
            "lr": LR,
            "model": "8 blocks, d_model 64, 4 heads, vocabulary 2,000",
            "unigram_loss": unigram_loss(training),
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
