"""The Complete Works of Shakespeare as word-level token ids, split and cut into sequences.

text = load_shakespeare(path)          # body of Project Gutenberg eBook #100
tokens = tokenize(text)                # re.split(r"\\b"): words, spaces and punctuation
vocab = Vocab.build(tokens)            # ids sorted by frequency: 0 is the most common token
data = TokenData.from_text(text, vocab)
x, y = data.train_batch(step, batch_size, seq_len, seed)
data, vocab = load_data(path)          # all of the above in one call
"""

import os
import re
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

GUTENBERG_URL = "https://www.gutenberg.org/cache/epub/100/pg100.txt"
DATA_ENV_VAR = "GPT_SHAKESPEARE"
_START_MARKER = "*** START OF"
_END_MARKER = "*** END OF"
_TITLE = "COMPLETE WORKS OF WILLIAM SHAKESPEARE"


class DataError(RuntimeError):
    """The corpus could not be found, read or recognized; the message says what to do."""


def default_cache_path() -> Path:
    cache_home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache_home / "gpt-shakespeare" / "pg100.txt"


def _download(url: str, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_suffix(".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            partial.write_bytes(response.read())
    except (urllib.error.URLError, OSError) as err:
        partial.unlink(missing_ok=True)
        raise DataError(
            f"could not download the Complete Works from {url} ({err}); "
            f"offline? pass --data PATH to a copy of Project Gutenberg eBook #100 (or set {DATA_ENV_VAR})"
        ) from None
    os.replace(partial, destination)  # atomic: never leave a half-written cache file behind


def _extract_body(raw: str, source: str) -> str:
    """Keep the text between the Gutenberg START and END marker lines."""
    start = raw.find(_START_MARKER)
    end = raw.find(_END_MARKER)
    if start < 0 or end < start or _TITLE not in raw[start : raw.find("\n", start)].upper():
        raise DataError(
            f"{source} is not Project Gutenberg eBook #100 (no '*** START OF ... {_TITLE}' / '*** END OF' lines); "
            "pass --data PATH to the Complete Works of Shakespeare"
        )
    return raw[raw.index("\n", start) + 1 : end]


def load_shakespeare(path: str | os.PathLike | None = None) -> str:
    """Return the body of the Complete Works as one string (UTF-8, BOM dropped, LF line ends).

    Where it comes from, first match wins: `path`, the GPT_SHAKESPEARE environment variable,
    the user cache file, a download into that cache.
    """
    if path is None:
        path = os.environ.get(DATA_ENV_VAR) or None
    if path is None:
        path = default_cache_path()
        if not path.exists():
            _download(GUTENBERG_URL, path)
    path = Path(path)
    try:
        raw = path.read_bytes().decode("utf-8-sig")  # utf-8-sig strips the byte-order mark
    except FileNotFoundError:
        raise DataError(
            f"data file {path} does not exist; pass --data PATH to the Complete Works of Shakespeare"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(
            f"cannot read data file {path} as UTF-8 text ({err}); pass --data PATH to a readable copy"
        ) from None
    return _extract_body(raw.replace("\r\n", "\n"), str(path))


def tokenize(text: str) -> list[str]:
    """Split at word boundaries: words, runs of spaces/newlines and punctuation become tokens.

    Nothing is lost: "".join(tokenize(text)) == text.
    """
    return [token for token in re.split(r"\b", text) if token]


class Vocab:
    """Token <-> id, ids sorted by frequency (most common first, ties alphabetical).

    Frequency order lets an adaptive softmax give the first ids a full-size output.
    """

    def __init__(self, tokens_by_id: list[str]):
        self.tokens_by_id = list(tokens_by_id)
        self.id_of = {token: i for i, token in enumerate(self.tokens_by_id)}

    @classmethod
    def build(cls, tokens: list[str]) -> "Vocab":
        counts = Counter(tokens)
        return cls(sorted(counts, key=lambda token: (-counts[token], token)))

    def __len__(self) -> int:
        return len(self.tokens_by_id)

    def encode(self, tokens: list[str]) -> list[int]:
        unknown = sorted({t for t in tokens if t not in self.id_of})
        if unknown:
            shown = ", ".join(repr(t) for t in unknown[:5])
            raise ValueError(f"{len(unknown)} token(s) not in the vocabulary: {shown}; use words from the corpus")
        return [self.id_of[t] for t in tokens]

    def decode(self, ids) -> str:
        return "".join(self.tokens_by_id[int(i)] for i in ids)

    def state_dict(self) -> dict:
        return {"tokens_by_id": self.tokens_by_id}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Vocab":
        return cls(state["tokens_by_id"])


@dataclass
class TokenData:
    """Token ids split into training (first 90%) and validation (last 10%, contiguous)."""

    train: torch.Tensor  # (N_train,) int64
    val: torch.Tensor  # (N_val,) int64

    @classmethod
    def from_text(cls, text: str, vocab: Vocab, val_fraction: float = 0.1) -> "TokenData":
        ids = torch.tensor(vocab.encode(tokenize(text)), dtype=torch.long)
        n_train = len(ids) - int(len(ids) * val_fraction)
        return cls(train=ids[:n_train], val=ids[n_train:])

    @staticmethod
    def sequences(ids: torch.Tensor, seq_len: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Cut ids[offset:] into non-overlapping chunks of seq_len + 1 tokens; return (inputs, targets),
        each (n_seq, seq_len): inputs = chunk[:-1], targets = chunk[1:].

        Every token belongs to exactly one chunk (a tail shorter than one chunk is left out).
        """
        chunk = seq_len + 1
        n_seq = (len(ids) - offset) // chunk
        if n_seq < 1:
            raise ValueError(
                f"need at least {chunk} tokens for one sequence of --seq-len {seq_len}, got {len(ids) - offset}"
            )
        chunks = ids[offset : offset + n_seq * chunk].view(n_seq, chunk)
        return chunks[:, :-1], chunks[:, 1:]

    def train_batch(
        self, step: int, batch_size: int, seq_len: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch for `step`: a pure function of its arguments, so a resumed run sees the same data.

        Each epoch cuts the training split into non-overlapping chunks (see `sequences`) starting
        at an offset drawn from (seed, epoch), and visits every chunk once in a shuffled order.
        Why the offset moves: `\\b` tokens strictly alternate word / non-word, so with chunk
        starts fixed at one parity a model learns "even positions hold words" from its position
        embedding, and fails on text cut at the other parity (the validation split starts at an odd
        token). Moving starts (and odd chunk lengths, seq_len + 1 for an even seq_len) show both.
        With world_size > 1 the global batch of batch_size * world_size chunks is split so that
        each rank gets a disjoint share.
        """
        n_seq = (len(self.train) - seq_len) // (seq_len + 1)  # chunks that fit after any offset <= seq_len
        global_batch = batch_size * world_size
        if not 0 < global_batch <= n_seq:
            raise ValueError(f"batch of {global_batch} sequences exceeds the {n_seq} training sequences")
        batches_per_epoch = n_seq // global_batch
        epoch, position = divmod(step, batches_per_epoch)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        offset = int(torch.randint(0, seq_len + 1, (), generator=generator))
        inputs, targets = self.sequences(self.train[: offset + n_seq * (seq_len + 1)], seq_len, offset)
        order = torch.randperm(n_seq, generator=generator)
        chosen = order[position * global_batch : (position + 1) * global_batch][rank::world_size]
        return inputs[chosen], targets[chosen]


def load_data(path: str | os.PathLike | None = None, vocab: Vocab | None = None) -> tuple[TokenData, Vocab]:
    """The corpus as (TokenData, Vocab); path None: $GPT_SHAKESPEARE, else a cached download.
    A given vocab (a checkpoint's) is kept, not rebuilt."""
    text = load_shakespeare(path)
    if vocab is None:
        vocab = Vocab.build(tokenize(text))
    try:
        return TokenData.from_text(text, vocab), vocab
    except ValueError:  # words the vocabulary lacks
        raise DataError(
            "the data has words that the checkpoint's vocabulary lacks: was it trained on other data? "
            "pass the same --data as the run that wrote it"
        ) from None
