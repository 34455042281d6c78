"""A small, hackable GPT trained on Shakespeare; attention runs through `kernels.attention`."""

from .model import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
