"""Reversal with learned, sinusoidal and no positional embeddings (and no mask + no positions).

    python docs/experiments/positions.py    # ~2-4 min; writes docs/results/positions.{json,png}

Each run is `python -m gpt.reverse --pos-embedding KIND --seed S` (default 1000 steps; one
sinusoidal run gets 2000), run in-process. Also recorded: how often each position predicts the
separator, and how large the position vectors are next to the token embeddings at initialization
(the likely reason sinusoidal learns late here).
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from common import save, save_figure

from gpt.model import GPT
from gpt.reverse import SEPARATOR, ReverseSettings, held_out_digits, position_labels, reversal_examples, run

VARIANTS = {  # name -> (ReverseSettings fields, seeds)
    "learned": (dict(pos_embedding="learned"), (0, 1)),
    "sinusoidal": (dict(pos_embedding="sinusoidal"), (0, 1)),
    "sinusoidal, 2000 steps": (dict(pos_embedding="sinusoidal", steps=2000), (0,)),  # seed 0 is late at 1000
    "none": (dict(pos_embedding="none"), (0, 1)),
    "none, no mask": (dict(pos_embedding="none", causal=False), (0,)),
}


@torch.no_grad()
def separator_guess_rate(model: GPT, n_digits: int) -> list[float]:
    """At each target position, how often the model's prediction is the separator."""
    inputs, _ = reversal_examples(held_out_digits(n_digits))
    predictions = model(inputs)[0].argmax(dim=-1)
    return [round(rate, 4) for rate in (predictions == SEPARATOR).float().mean(dim=0).tolist()]


def embedding_norms_at_init(settings: ReverseSettings) -> dict:
    """Mean L2 norm of a token embedding and of a position vector in a freshly initialized model."""
    model = GPT(settings.model_config())
    positions = model.position_embedding(torch.arange(2 * settings.n_digits))
    return {
        "token": model.token_embedding.weight.norm(dim=-1).mean().item(),
        "position": positions.norm(dim=-1).mean().item(),
    }


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    for name, (fields, seeds) in VARIANTS.items():
        for seed in seeds:
            settings = ReverseSettings(seed=seed, **fields)
            model, result, losses = run(settings)
            rows.append(
                {
                    "variant": name,
                    "seed": seed,
                    "steps": settings.steps,
                    "final_loss": sum(losses[-50:]) / 50,
                    **result,
                    "separator_guess_rate": separator_guess_rate(model, settings.n_digits),
                }
            )
            print(
                f"{name:22s} seed {seed}: first half {result['first_half_accuracy']:.3f}, "
                f"second half {result['second_half_accuracy']:.3f}"
            )
    norms = {kind: embedding_norms_at_init(ReverseSettings(pos_embedding=kind)) for kind in ("learned", "sinusoidal")}

    fig, ax = plt.subplots(figsize=(8, 4))
    labels = position_labels(ReverseSettings().n_digits)
    for row in rows:
        ax.plot(range(len(labels)), row["per_position_accuracy"], "o-", label=f"{row['variant']} (seed {row['seed']})")
    ax.axhline(0.1, color="gray", linestyle=":", label="chance")
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set(xlabel="target", ylabel="held-out accuracy", title="Reversal, 8 digits, 1000 steps unless noted")
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, "positions")
    save("positions", {"position_labels": labels, "runs": rows, "embedding_norms_at_init": norms})


if __name__ == "__main__":
    main()
