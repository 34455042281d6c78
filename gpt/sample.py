"""Let a trained model continue a prompt.

    python -m gpt.sample --ckpt out/ckpt.pt --prompt "ROMEO." --tokens 200

The prompt is tokenized like the corpus (words, spaces and punctuation); every word must be in
the model's vocabulary. Expected problems (missing or corrupt checkpoint, unknown words, bad
values) end with one line on stderr and exit code 2.

gpt.train also uses `complete(model, vocab, "ROMEO.", tokens=200)` for the sample at the end of a run.
"""

import argparse
import sys

import torch

import kernels

from .checkpoint import load_checkpoint, restore_model
from .cli import MAX_SEED, ArgumentParser, check_number, pick_device, resolve_attention, run_program
from .data import Vocab, tokenize
from .model import GPT

# Below this, sampling is greedy in effect (a logit gap of 0.05 is a factor e^50), and as the
# temperature nears 0, logits / temperature overflow float32 into NaN probabilities.
MIN_TEMPERATURE = 1e-3


def complete(
    model: GPT,
    vocab: Vocab,
    prompt: str,
    tokens: int,
    temperature: float = 0.8,
    top_k: int | None = 200,
    seed: int = 1337,
    device: torch.device | str = "cpu",
) -> str:
    """The prompt followed by `tokens` sampled tokens, as text. The same seed gives the same text.
    top_k None: sample among all tokens."""
    check_sampling(tokens, temperature, top_k, seed)
    ids = vocab.encode(tokenize(prompt))
    if not ids:
        raise ValueError("the prompt is empty; give at least one word, e.g. --prompt 'ROMEO.'")
    model.eval()  # no dropout while sampling
    generator = torch.Generator(device).manual_seed(seed)
    out = model.generate(
        torch.tensor([ids], device=device), tokens, temperature=temperature, top_k=top_k, generator=generator
    )
    return vocab.decode(out[0].tolist())


def check_sampling(tokens: int, temperature: float, top_k: int | None, seed: int) -> None:
    """Each setting finite and in its range, or a one-line ValueError."""
    check_number("--tokens", tokens, 0)
    check_number("--temperature", temperature, MIN_TEMPERATURE, fix="for greedy sampling use --top-k 1")
    check_number("--top-k", top_k, 1)  # None: all tokens
    check_number("--seed", seed, 0, MAX_SEED)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m gpt.sample", description="Sample text from a trained checkpoint.")
    parser.add_argument("--ckpt", default="out/ckpt.pt", help="checkpoint written by gpt.train (default: out/ckpt.pt)")
    parser.add_argument(
        "--prompt", default="ROMEO.", help="text to continue; words must be in the vocabulary (default: ROMEO.)"
    )
    parser.add_argument(
        "--tokens",
        type=int,
        default=200,
        help="tokens to generate; words, spaces and punctuation each count (default: 200)",
    )
    parser.add_argument(
        "--temperature", type=float, default=0.8, help="below 1: safer, more repetitive; above 1: wilder (default: 0.8)"
    )
    parser.add_argument(
        "--top-k", type=int, default=200, help="sample only among the k likeliest tokens; 0: all (default: 200)"
    )
    parser.add_argument(
        "--seed", type=int, default=1337, help="random seed; the same seed gives the same text (default: 1337)"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    parser.add_argument(
        "--attn",
        default="auto",
        choices=kernels.BACKEND_CHOICES,
        help="attention backend; auto: triton on CUDA, sdpa elsewhere (default: auto)",
    )
    return parser


def sample_from_checkpoint(args: argparse.Namespace) -> int:
    check_number("--top-k", args.top_k, 0, fix="0 samples among all tokens")
    top_k = args.top_k or None
    check_sampling(args.tokens, args.temperature, top_k, args.seed)  # before loading anything
    device = pick_device(args.device)
    state = load_checkpoint(args.ckpt)
    model, vocab = restore_model(state, attn=resolve_attention(args.attn, device))
    print(complete(model.to(device), vocab, args.prompt, args.tokens, args.temperature, top_k, args.seed, device))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_program(lambda: sample_from_checkpoint(args))


if __name__ == "__main__":
    sys.exit(main())
