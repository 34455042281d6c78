"""Let a trained model continue a prompt.

    python -m gpt.sample --ckpt out/ckpt.pt --prompt "ROMEO." --tokens 200

The prompt is tokenized like the corpus (words, spaces and punctuation); every word must be in
the model's vocabulary. Expected problems (missing or corrupt checkpoint, unknown words, bad
values) end with one line on stderr and exit code 2.

Also the command-line, device and attention-backend helpers that gpt.train shares:
    device = pick_device("cuda")                      # ValueError, in words, if there is no such device
    backend = resolve_attention("auto", device)       # a concrete backend; ValueError if Triton cannot load
    text = complete(model, vocab, "ROMEO.", tokens=200)
"""
import argparse
import importlib
import sys

import torch

import kernels

from .checkpoint import CheckpointError, load_checkpoint, restore_model
from .data import Vocab, tokenize
from .model import GPT


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (exit code 2) instead of usage + error."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def pick_device(name: str | None, local_rank: int = 0) -> torch.device:
    """A device by name (None: cuda if available, else cpu); a bare "cuda" means GPU `local_rank`."""
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name} asked for, but PyTorch sees no CUDA GPU; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def resolve_attention(name: str, device: torch.device) -> str:
    """--attn -> a concrete backend for `device`. Fails here, in one line, if Triton cannot load,
    rather than with a traceback at the first forward pass."""
    backend = kernels.resolve_backend(name, device)
    if backend == "triton":
        try:
            importlib.import_module("kernels.triton_attention")
        except Exception as err:  # ImportError, or Triton failing to initialize: any reason is fatal here
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"--attn triton is unavailable ({reason}); use --attn sdpa or --attn reference") from None
    return backend


def complete(model: GPT, vocab: Vocab, prompt: str, tokens: int, temperature: float = 0.8, top_k: int | None = 200,
             seed: int = 1337, device: torch.device | str = "cpu") -> str:
    """The prompt followed by `tokens` sampled tokens, as text. The same seed gives the same text."""
    ids = vocab.encode(tokenize(prompt))
    if not ids:
        raise ValueError("the prompt is empty; give at least one word, e.g. --prompt 'ROMEO.'")
    if tokens < 0:
        raise ValueError(f"--tokens must not be negative, got {tokens}")
    model.eval()  # no dropout while sampling
    generator = torch.Generator(device).manual_seed(seed)
    out = model.generate(torch.tensor([ids], device=device), tokens, temperature=temperature, top_k=top_k,
                         generator=generator)
    return vocab.decode(out[0].tolist())


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m gpt.sample", description="Sample text from a trained checkpoint.")
    parser.add_argument("--ckpt", default="out/ckpt.pt", help="checkpoint written by gpt.train (default: out/ckpt.pt)")
    parser.add_argument("--prompt", default="ROMEO.", help="text to continue; words must be in the vocabulary (default: ROMEO.)")
    parser.add_argument("--tokens", type=int, default=200, help="tokens to generate; words, spaces and punctuation each count (default: 200)")
    parser.add_argument("--temperature", type=float, default=0.8, help="below 1: safer, more repetitive; above 1: wilder (default: 0.8)")
    parser.add_argument("--top-k", type=int, default=200, help="sample only among the k likeliest tokens; 0: all (default: 200)")
    parser.add_argument("--seed", type=int, default=1337, help="random seed; the same seed gives the same text (default: 1337)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    parser.add_argument("--attn", default="auto", choices=(*kernels.BACKENDS, "auto"),
                        help="attention backend; auto: triton on CUDA, reference elsewhere (default: auto)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        state = load_checkpoint(args.ckpt)
        device = pick_device(args.device)
        model, vocab = restore_model(state, attn=resolve_attention(args.attn, device))
        text = complete(model.to(device), vocab, args.prompt, args.tokens, args.temperature, args.top_k or None,
                        args.seed, device)
    except (CheckpointError, ValueError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
