"""Q3: separate weights in every block vs one block reused (GPTConfig.share_blocks), at equal steps.

    python docs/experiments/share_blocks.py    # ~2-4 min; writes docs/results/share_blocks.{json,png}

Three small Shakespeare models (d_model 64, 2,000-word vocabulary), trained with the same data
order, seeds and learning rate for the same number of steps (two seeds each):
    4 separate blocks         the standard transformer
    1 block applied 4 times   the same compute, a quarter of the block parameters
    1 block                   the same parameters as the shared model, a quarter of the compute
"""

import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from common import lm_batches, lm_config, loss_on, moving_average, save, save_figure, shakespeare, unigram_loss

from gpt.model import GPT
from gpt.reverse import train_model

STEPS, BATCH_SIZE, SEQ_LEN, LR, SEEDS = 400, 16, 64, 2e-3, (0, 1)
VARIANTS = {
    "4 separate blocks": dict(n_layer=4),
    "1 block applied 4 times": dict(n_layer=4, share_blocks=True),
    "1 block": dict(n_layer=1),
}


def main() -> None:
    torch.set_num_threads(1)
    training, held_out = shakespeare(SEQ_LEN)
    rows, curves = [], {}
    for name, overrides in VARIANTS.items():
        for seed in SEEDS:
            torch.manual_seed(seed)
            model = GPT(lm_config(block_size=SEQ_LEN, **overrides))
            started = time.perf_counter()
            losses = train_model(model, lm_batches(training, BATCH_SIZE, seed), STEPS, LR)
            rows.append(
                {
                    "variant": name,
                    "seed": seed,
                    "parameters": model.num_parameters(),
                    "block_parameters": sum(p.numel() for p in model.blocks.parameters()),  # shared ones once
                    "block_applications": len(model.blocks),
                    "train_loss_last_50": sum(losses[-50:]) / 50,
                    "held_out_loss": loss_on(model, *held_out),
                    "train_seconds": time.perf_counter() - started,
                }
            )
            curves[f"{name} (seed {seed})"] = losses
            print(rows[-1])
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, losses in curves.items():
        ax.plot(moving_average(losses), label=name)
    ax.set(xlabel="step", ylabel="training loss (20-step mean)", ylim=(None, 6))
    ax.legend()
    save_figure(fig, "share_blocks")
    save(
        "share_blocks",
        {
            "unigram_loss": unigram_loss(training),
            "steps": STEPS,
            "batch_size": BATCH_SIZE,
            "seq_len": SEQ_LEN,
            "lr": LR,
            "model": "d_model 64, 4 heads, vocabulary 2,000",
            "results": rows,
            "train_losses": curves,
        },
    )


if __name__ == "__main__":
    main()
