"""A decoder-only transformer language model, written from first principles.

Reading order, top to bottom:
    GPTConfig                 every size and switch of the model in one dataclass (the training flags)
    PositionalEmbedding       tells the model *where* each token is (learned or sinusoidal, added to x)
    Rotary                    ... or by rotating queries and keys (rotary: only relative positions count)
    AdaptiveInput             token embeddings that share the adaptive softmax's weights
    CausalSelfAttention       each position gathers information from earlier positions
    MLP                       each position thinks on its own about what it gathered
    Block                     attention + MLP, each in a pre-LayerNorm residual branch
    GPT                       embeddings -> blocks -> final norm -> LM head; loss; generate()

Attention itself is one call, `kernels.attention(q, k, v, causal=..., backend=...)`: the
model never looks at which backend runs it.
"""

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

POS_EMBEDDINGS = ("learned", "sinusoidal", "rotary", "none")  # how the model sees positions
HEADS = ("full", "adaptive")  # the output layer: Linear to every word, or nn.AdaptiveLogSoftmaxWithLoss
Rotation = tuple[torch.Tensor, torch.Tensor]  # rotary positions' (cos, sin), each (T, head_dim / 2)


def option(default, help: str, **flag):
    """A settings field that documents itself: one default and one line of help. gpt.config turns
    each one into a command-line flag (--name-with-dashes); `flag` holds extra argparse arguments."""
    if isinstance(default, list):  # a mutable default: each config gets its own copy
        return field(default_factory=default.copy, metadata={"help": help, **flag})
    return field(default=default, metadata={"help": help, **flag})


@dataclass
class GPTConfig:
    """Every size and switch of the model. The defaults are the model of the default training run
    (python -m gpt.train), which generates its flags from these fields, except vocab_size and
    block_size: a run sets those from its data and --seq-len."""

    vocab_size: int = option(34_216, "distinct word-level tokens in the Complete Works")
    block_size: int = option(128, "longest context the model can see (positions 0..block_size-1)")
    n_layer: int = option(4, "transformer blocks")
    n_head: int = option(4, "attention heads per block; must divide d_model")
    d_model: int = option(128, "width of the residual stream (embedding size)")
    dropout: float = option(0.1, "dropout probability inside the model (training switches it on after --dropout-after)")
    attn: str = option(
        "auto", "attention backend; auto: triton on CUDA, sdpa elsewhere", choices=kernels.BACKEND_CHOICES
    )
    pos_embedding: str = option(
        "rotary", "how the model sees positions (rotary: learns much faster than learned)", choices=POS_EMBEDDINGS
    )
    head: str = option(
        "adaptive", "output layer: full softmax, or adaptive softmax (cheaper for rare words)", choices=HEADS
    )
    adaptive_cutoffs: list[int] = option(
        [2_000, 10_000], "word ids (sorted by frequency) where the adaptive head's clusters start", nargs="+", type=int
    )
    tie_embeddings: bool = option(
        True, "share the token embedding with the output layer (adaptive head: adaptive input embeddings)"
    )
    # Switches for experiments (docs/first_principles.md); the defaults are the standard transformer.
    causal: bool = option(True, "the causal mask; off, positions see the future (a debugging control)")
    residual: bool = option(True, "residual connections x + f(x); off: x = f(x)")
    layer_norm: bool = option(True, "LayerNorm before each branch and at the end")
    share_blocks: bool = option(False, "one Block's weights reused n_layer times")

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.pos_embedding not in POS_EMBEDDINGS:
            raise ValueError(f"pos_embedding must be one of {', '.join(POS_EMBEDDINGS)}, got {self.pos_embedding!r}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.pos_embedding == "rotary" and (self.d_model // self.n_head) % 2:
            raise ValueError(
                f"rotary positions rotate pairs of dimensions: d_model / n_head ({self.d_model // self.n_head}) "
                "must be even"
            )
        if (
            self.head == "adaptive"
            and not 0 < min(self.adaptive_cutoffs) <= max(self.adaptive_cutoffs) < self.vocab_size
        ):
            raise ValueError(
                f"adaptive_cutoffs {self.adaptive_cutoffs} must lie inside (0, vocab_size={self.vocab_size}); "
                "for a vocabulary this small use head='full' (--head full)"
            )
        kernels.resolve_backend(self.attn, "cpu")  # fail early on an unknown backend name


class PositionalEmbedding(nn.Module):
    """Maps positions 0..T-1 to vectors added to the token embeddings.

    Attention itself is blind to order (it is a weighted sum over a set), so without this the
    model could not tell "dog bites man" from "man bites dog" beyond what the mask reveals.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.kind = config.pos_embedding
        if self.kind == "learned":
            self.table = nn.Embedding(config.block_size, config.d_model)
        elif self.kind == "sinusoidal":
            # Vaswani et al.: dimension pair (2i, 2i+1) is a sine/cosine of frequency 1/10000^(2i/d).
            position = torch.arange(config.block_size, dtype=torch.float32)[:, None]  # (block_size, 1)
            frequency = torch.exp(torch.arange(0, config.d_model, 2) * (-math.log(10_000.0) / config.d_model))
            table = torch.zeros(config.block_size, config.d_model)
            table[:, 0::2] = torch.sin(position * frequency)
            table[:, 1::2] = torch.cos(position * frequency)
            self.register_buffer("table_fixed", table, persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor | float:
        if self.kind == "learned":
            return self.table(positions)  # (T, d_model)
        if self.kind == "sinusoidal":
            return self.table_fixed[positions]  # (T, d_model)
        return 0.0  # "rotary": positions enter in attention (Rotary); "none": no position information at all


class Rotary(nn.Module):
    """Rotary position embeddings (Su et al., 2021): rotate each query and key by its position.

    Dimension i of a head's first half is paired with dimension i of its second half, and the pair
    is rotated by the angle position x 10000^(-2i/head_dim). A query at position m and a key at n
    then score q.k through the rotation by (m - n) alone: attention sees how far back a token is,
    not where it is, and nothing is added to the residual stream.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        head_dim = config.d_model // config.n_head
        frequency = 10_000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (head_dim/2,)
        angle = torch.arange(config.block_size, dtype=torch.float32)[:, None] * frequency  # (block_size, head_dim/2)
        self.register_buffer("cos", angle.cos(), persistent=False)
        self.register_buffer("sin", angle.sin(), persistent=False)

    def forward(self, positions: torch.Tensor) -> Rotation:
        return self.cos[positions], self.sin[positions]


def rotate(x: torch.Tensor, rotation: Rotation) -> torch.Tensor:
    """Rotate the pairs (x[..., i], x[..., i + D/2]) of x (B, H, T, D) by Rotary's angles."""
    cos, sin = (t.to(x.dtype) for t in rotation)  # under autocast x may be bfloat16: keep it so
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class AdaptiveInput(nn.Module):
    """Token embeddings made of the adaptive softmax's own weights (Baevski & Auli, 2019).

    The adaptive head scores a frequent word with a d_model row of head.head, and a word of
    cluster i with a small vector (row of tail[i][1], d_model / 4^(i+1) wide) after a projection
    (tail[i][0]). Reading the same vectors as embeddings, projected back up by the transpose of
    that projection, ties input and output the way a shared matrix does for a full softmax: the
    34k-word table stops being a second copy of the vocabulary, and a rare word's few training
    steps update one vector that serves both ends.
    """

    def __init__(self, head: nn.AdaptiveLogSoftmaxWithLoss):
        super().__init__()
        self.head = head  # shared, not copied: its parameters are the lm_head's

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (...) -> embeddings (..., d_model)."""
        flat = idx.reshape(-1)
        out = torch.zeros(len(flat), self.head.in_features, device=idx.device, dtype=self.head.head.weight.dtype)
        bounds = [0, *self.head.cutoffs]  # cluster c holds ids bounds[c] <= id < bounds[c + 1]
        for cluster, (low, high) in enumerate(zip(bounds, bounds[1:])):
            chosen = (flat >= low) & (flat < high)
            if cluster == 0:  # the shortlist: head.head's first rows are full-width word vectors
                out[chosen] = F.embedding(flat[chosen], self.head.head.weight[:high])
            else:
                project, words = self.head.tail[cluster - 1]  # Linear(d_model, d_c), Linear(d_c, cluster size)
                vectors = F.embedding(flat[chosen] - low, words.weight) @ project.weight  # (n, d_c) @ (d_c, d)
                out[chosen] = vectors.to(out.dtype)  # under autocast the product may be bfloat16
        return out.view(*idx.shape, -1)


class KVCache:
    """Keys and values of the tokens seen so far, one (k, v) pair per layer.

    With it, generating token t+1 only computes q, k, v for token t and attends over the cached
    keys: O(T) work per new token instead of recomputing the whole O(T^2) prefix.
    """

    def __init__(self, n_layer: int):
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[-2]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add this step's k, v (B, H, T_new, D) for `layer`; return all keys and values so far."""
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=-2)
            v = torch.cat([self.values[layer], v], dim=-2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class CausalSelfAttention(nn.Module):
    """Multi-head attention where each position attends only to itself and earlier positions."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.causal = config.causal
        self.attn_backend = config.attn
        # One matmul makes queries, keys and values for all heads at once.
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.proj.is_residual_projection = True  # scaled init, see GPT._init_weights
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, rotation: Rotation | None = None, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        B, T, C = x.shape
        # (B, T, 3C) -> (B, T, 3, H, D) -> three (B, H, T, D) views into the same memory
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).unbind(dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if rotation is not None:  # rotary positions: keys are cached already rotated
            q, k = rotate(q, rotation), rotate(k, rotation)
        if cache is not None:
            k, v = cache.append(layer, k, v)  # k, v: (B, H, T_cached + T, D)
        y = kernels.attention(q, k, v, causal=self.causal, backend=self.attn_backend)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)  # heads side by side again
        return self.dropout(self.proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward network: the same two-layer MLP applied to every position."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.up = nn.Linear(config.d_model, 4 * config.d_model)
        self.down = nn.Linear(4 * config.d_model, config.d_model)
        self.down.is_residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.gelu(self.up(x))))


class Block(nn.Module):
    """x + attention(norm(x)), then x + mlp(norm(x)): the pre-LayerNorm residual block.

    The residual stream x carries information straight through; each branch only adds a
    correction, so gradients reach early layers through the identity path undiminished.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.residual = config.residual
        self.norm1 = nn.LayerNorm(config.d_model) if config.layer_norm else nn.Identity()
        self.attn = CausalSelfAttention(config)
        self.norm2 = nn.LayerNorm(config.d_model) if config.layer_norm else nn.Identity()
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, rotation: Rotation | None = None, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        a = self.attn(self.norm1(x), rotation, cache, layer)
        x = x + a if self.residual else a
        m = self.mlp(self.norm2(x))
        return x + m if self.residual else m


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.position_embedding = PositionalEmbedding(config)
        self.rotary = Rotary(config) if config.pos_embedding == "rotary" else None
        self.dropout = nn.Dropout(config.dropout)
        if config.share_blocks:
            # One set of weights applied n_layer times (each application keeps its own cache slot).
            self.blocks = nn.ModuleList([Block(config)] * config.n_layer)
        else:
            self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.final_norm = nn.LayerNorm(config.d_model) if config.layer_norm else nn.Identity()
        if config.head == "full":
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        else:
            # Frequent words get a full-size output; rare ones share a cluster and a smaller projection.
            self.lm_head = nn.AdaptiveLogSoftmaxWithLoss(
                config.d_model, config.vocab_size, cutoffs=config.adaptive_cutoffs, div_value=4.0
            )
        # The token embedding comes last because a tied one is made of the output layer's weights.
        if config.tie_embeddings and config.head == "adaptive":
            self.token_embedding = AdaptiveInput(self.lm_head)
        else:
            self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
            if config.tie_embeddings:
                self.lm_head.weight = self.token_embedding.weight
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2 init: small normal weights; the projections that write into the residual stream are
        # scaled down by sqrt(2 * n_layer) so the stream's variance does not grow with depth.
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "is_residual_projection", False):
                std /= math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def set_dropout(self, p: float) -> None:
        """Change every dropout layer's probability (gpt.train switches dropout on late in a run)."""
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = p

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Token ids (B, T) -> final normalized hidden states (B, T, d_model)."""
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(
                f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}; "
                "use a shorter --seq-len or a model with a larger block_size"
            )
        positions = torch.arange(start, start + T, device=idx.device)
        x = self.dropout(self.token_embedding(idx) + self.position_embedding(positions))  # (B, T, C)
        rotation = self.rotary(positions) if self.rotary is not None else None
        for layer, block in enumerate(self.blocks):
            x = block(x, rotation, cache, layer)
        return self.final_norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., d_model) -> scores over the vocabulary (..., vocab_size).

        For the adaptive head these are exact log-probabilities, which work as logits.
        """
        if self.config.head == "full":
            return self.lm_head(hidden)
        with self._adaptive_head_in_float32(hidden) as flat:
            return self.lm_head.log_prob(flat).view(*hidden.shape[:-1], -1)

    @contextlib.contextmanager
    def _adaptive_head_in_float32(self, hidden: torch.Tensor):
        """(..., d_model) -> (N, d_model) float32 with autocast off: AdaptiveLogSoftmaxWithLoss
        copies its clusters' log-probabilities into one float32 buffer, which fails when
        autocast has made some of them bfloat16; the head is small, so float32 costs little."""
        with torch.autocast(hidden.device.type, enabled=False):
            yield hidden.reshape(-1, hidden.shape[-1]).float()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Returns (logits, loss).

        idx, targets: (B, T) token ids; targets[t] is the token that follows idx[t].
        logits: (B, T, vocab_size); None for the adaptive head when targets are given, since
        computing every word's score is exactly the cost that head exists to avoid.
        loss: mean cross-entropy (natural log) over all positions, or None without targets.
        """
        hidden = self.hidden_states(idx)
        if targets is None:
            return self.logits(hidden), None
        if self.config.head == "adaptive":
            with self._adaptive_head_in_float32(hidden) as flat:
                return None, self.lm_head(flat, targets.reshape(-1)).loss
        logits = self.lm_head(hidden)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ):
        """Append max_new_tokens sampled tokens to idx (B, T); returns (B, T + max_new_tokens).

        With the cache, each step feeds only the newest token. When the context fills
        block_size, the window slides: positions shift, so the cache is rebuilt from the last
        block_size tokens, which gives exactly what the uncached model computes.
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        cache = None
        for _ in range(max_new_tokens):
            if not use_cache:
                hidden = self.hidden_states(idx[:, -self.config.block_size :])
            elif cache is None or cache.length >= self.config.block_size:
                cache = KVCache(self.config.n_layer)
                hidden = self.hidden_states(idx[:, -self.config.block_size :], cache)
            else:
                hidden = self.hidden_states(idx[:, -1:], cache)
            logits = self.logits(hidden[:, -1, :]).float() / temperature  # (B, vocab)
            if top_k is not None:
                kth_best = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, [-1]]
                logits = logits.masked_fill(logits < kth_best, float("-inf"))
            next_token = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)  # (B, 1)
            idx = torch.cat([idx, next_token], dim=1)
        return idx
