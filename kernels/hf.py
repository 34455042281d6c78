"""Our attention inside Hugging Face transformers models: `attn_implementation="gpt_kernels"`.

    import kernels.hf
    from transformers import AutoModelForCausalLM

    kernels.hf.register()  # once per process, before the model runs
    model = AutoModelForCausalLM.from_pretrained("...", attn_implementation="gpt_kernels")

transformers lets a library add an attention implementation under a name: an attention
function (AttentionInterface) that every attention layer calls, and a mask function
(AttentionMaskInterface) that builds, once per forward and kind of layer (full or sliding
window), the mask those layers receive. Without a mask function transformers builds no
mask at all for a name it does not know, so padding, sliding windows and the empty slots
of a static cache would vanish. register() installs both.

Alignment. transformers places query i at position q_offset + i and key j at kv_offset + j
(positions in the cache, padding included) and masks by those positions. Our kernels align
bottom-right instead: query i of q_len sits at key i + kv_len - q_len, so the last query
is the last key. The two agree once every key that is padding, an empty static-cache slot,
or (with causal masks) after the last query is dropped: that is what the mask function
works out, from the 2-D padding mask and the offsets, and returns as a `KernelMask`:

- no padding among the keys it keeps: one dense `kernels.attention` call on a prefix of
  the keys (a view, no copy);
- otherwise (a batch of prompts of different lengths): `kernels.varlen_attention` on the
  real tokens of each row packed back to back, as FlashAttention does, so padding costs
  nothing. Queries on padding tokens come out as zeros (eager attention gives them an
  average of arbitrary values): a loss should leave out predictions made there.

K and V are never repeated per query head: the kernels read grouped kv heads themselves.

Mapped: causal masks, sliding windows (`window`), padding (`varlen_attention`), grouped
kv heads (passed through), `scaling` (`scale`), `softcap` (Gemma 2), attention dropout
(`dropout_p`, only while the module trains, as eager does), bidirectional masks without a
window. Refused, with one line naming the problem: no mask or a custom 4-D mask, mask
patterns the kernel cannot express (packed sequences in one row, chunked attention, a
bidirectional window, extra overlays), padding with holes inside a sliding window,
additive biases (ALiBi, T5's position bias), attention sinks, head masks, requests for the
attention weights, and any other argument that could change the result. The backend's
own refusals (a feature it lacks, see kernels.FEATURES) come through with the layer named.

Reading the padding mask and planning the packing happens on the host, once per forward
and mask kind (a device sync on a GPU), and a sliding-window layer's mask pattern is
evaluated once per forward (q_len x kv_len booleans) to check it is the kernel's. Under
torch.compile (generate() turns it on for static caches on a GPU) those host reads break
the graph; the results stay the same.
"""

import dataclasses
import functools
from typing import NamedTuple

import torch

import kernels
from kernels import reference

try:
    import transformers
    from transformers import AttentionInterface, masking_utils
    from transformers.masking_utils import AttentionMaskInterface
except ImportError as err:  # transformers is an optional dependency
    raise ImportError(
        f"kernels.hf needs transformers ({err}); install it with: pip install 'shakespeare-gpt[hf]'"
    ) from None

# 5.4 is the first release whose mask functions get the queries' and keys' offsets (before, a
# cache_position tensor); 6 may change the interfaces again.
if not (5, 4) <= tuple(int(part) for part in transformers.__version__.split(".")[:2]) < (6, 0):
    raise ImportError(
        f"kernels.hf needs transformers>=5.4,<6, found {transformers.__version__}; "
        "install it with: pip install 'shakespeare-gpt[hf]'"
    )

# Words transformers reads inside an implementation's name: "flash" turns on FlashAttention's
# code paths, "sdpa" and "flex_attention" their checks, "paged" continuous batching, "eager"
# its own attention. (A name with "/" would be a kernel to download from the Hub.)
_RESERVED_WORDS = ("flash", "sdpa", "flex_attention", "paged", "eager")

# Keyword arguments models pass to every attention layer that do not change attention's
# result: positions already live in the rotary embeddings and the mask, the rest is read by
# other modules (the cache, the loss, output recording).
_UNUSED_ARGUMENTS = frozenset(
    {
        "position_ids",
        "cache_position",
        "use_cache",
        "output_hidden_states",
        "output_router_logits",
        "num_items_in_batch",
    }
)
# Why an argument that changes the result is refused.
_SINKS = "attention sinks (a learned logit in every softmax's denominator)"
_PACKED = "FlashAttention's packed-sequence arguments (pad the batch and pass attention_mask instead)"
_REFUSED_ARGUMENTS = {
    "s_aux": _SINKS,
    "sinks": _SINKS,
    "position_bias": "an additive attention bias (T5's position bias)",
    "alibi": "an additive attention bias (ALiBi)",
    "attention_bias": "an additive attention bias",
    "head_mask": "a head mask",
    "cu_seq_lens_q": _PACKED,
    "cu_seq_lens_k": _PACKED,
    "max_length_q": _PACKED,
    "max_length_k": _PACKED,
    "seq_idx": _PACKED,
}


@dataclasses.dataclass(frozen=True)
class Packing:
    """Where the real tokens of a padded batch go in `kernels.varlen_attention`'s packed layout.

    query_rows and key_rows are (batch index, position) pairs of long tensors, row by row,
    so `x.transpose(1, 2)[rows]` packs a (B, H, T, D) tensor into (total, H, D); sequence s
    of the packed batch is batch row s (rows with no real token are empty sequences).
    """

    query_rows: tuple[torch.Tensor, torch.Tensor]
    key_rows: tuple[torch.Tensor, torch.Tensor]
    cu_seqlens_q: torch.Tensor  # int32, batch + 1 entries
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int


class MaskSpec(NamedTuple):
    """One forward as transformers describes it to the mask function, with the kernel's options.

    causal and window are the kernel's (bottom-right aligned); batch_size, q_len queries at
    positions q_offset + i and kv_len keys at kv_offset + j are transformers' (positions in
    the cache, padding included). The shapes are checked at every attention call.
    """

    causal: bool
    window: int | None
    batch_size: int
    q_len: int
    kv_len: int
    q_offset: int
    kv_offset: int


@dataclasses.dataclass(frozen=True)
class KernelMask:
    """What the mask function hands every attention layer of one kind, in place of a mask tensor.

    dense_kv_len: with no padding, the keys the kernel reads are k[:, :, :dense_kv_len]
    (the rest are empty static-cache slots or, with causal masks, after the last query);
    packing: otherwise, the varlen layout of the real tokens.
    """

    spec: MaskSpec
    dense_kv_len: int | None
    packing: Packing | None

    # generate() plans the masks of a static-cache step ahead and hands them to the model, which
    # passes them to the mask function again; transformers reads a mask whose ndim is 2 as padding.
    ndim = 4

    # Model code that uses a mask as a tensor (mask.dtype, mask[...], scores + mask) computes
    # attention itself instead of calling the attention function: say so, instead of a
    # TypeError or AttributeError deep inside the model.
    def __getattr__(self, name):
        if name.startswith("__"):  # copy, pickle and friends probe for optional methods
            raise AttributeError(name)
        raise _used_as_tensor(f".{name}")

    def __getitem__(self, index):
        raise _used_as_tensor("[...]")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # any torch function or operator
        raise _used_as_tensor(getattr(func, "__name__", str(func)))


def _used_as_tensor(use: str) -> ValueError:
    return ValueError(
        f"this model's code used the attention mask as a tensor ({use}): it computes attention itself instead of "
        "through transformers' AttentionInterface, which kernels.hf cannot serve; use attn_implementation='sdpa'"
    )


def register(name: str = "gpt_kernels", backend: str = "auto") -> str:
    """Register our attention and its mask function with transformers under `name`; returns `name`.

    Afterwards `from_pretrained(..., attn_implementation=name)`, `model.set_attn_implementation(name)`
    or `model.config._attn_implementation = name` runs every attention layer on `backend`
    ("reference", "sdpa", "triton" or "auto": see kernels.FEATURES for what each does).
    Registering a name again replaces it (transformers' registry is process-wide).
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name must be a Python identifier such as 'gpt_kernels', got {name!r}")
    reserved = next((word for word in _RESERVED_WORDS if word in name), None)
    if reserved is not None:
        raise ValueError(f"name must not contain {reserved!r}: transformers gives that word a meaning; got {name!r}")
    kernels.resolve_backend(backend, "cpu")  # refuses an unknown backend name
    if backend == "triton":
        reason = kernels.unavailable_reason("triton", "cuda" if torch.cuda.is_available() else "cpu")
        if reason is not None:
            raise ValueError(reason)
    AttentionInterface.register(name, functools.partial(attention_forward, backend=backend, name=name))
    AttentionMaskInterface.register(name, kernel_mask)
    return name


def _mask_pattern(mask_function, local_size, batch_size, q_len, kv_len, q_offset, kv_offset, use_vmap, device):
    """(causal, window) of transformers' mask function, or a one-line error if the kernel cannot compute it.

    The plain causal and bidirectional functions are recognised by identity. Any other (a
    sliding window, or whatever a model overlays) is evaluated once, by transformers itself,
    over every (query, key) of this forward, and must equal a pattern the kernel computes:
    causal with the announced window (`local_size`), or else causal or bidirectional.
    """
    if mask_function is masking_utils.causal_mask_function:
        return True, None
    if mask_function is masking_utils.bidirectional_mask_function:
        return False, None
    allowed = masking_utils.sdpa_mask(
        batch_size=batch_size,
        q_length=q_len,
        kv_length=kv_len,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=None,  # the pattern alone; padding is read separately
        allow_is_causal_skip=False,
        use_vmap=use_vmap,
        device=device,
    )  # (batch or 1, 1, q_len, kv_len)
    # In transformers' positions the kernel's pattern is its bottom-right one on the keys up to the
    # last query, and the keys after it are hidden by causality (seen without it).
    seen = q_offset - kv_offset + q_len  # keys up to the last query
    candidates = [(True, local_size)] if local_size is not None else [(True, None), (False, None)]
    for causal, window in candidates:
        up_to_last_query = reference.visible_keys(q_len, seen, causal=causal, window=window, device=device)
        after = torch.full((q_len, kv_len - seen), not causal, dtype=torch.bool, device=device)
        if torch.equal(allowed, torch.cat([up_to_last_query, after], dim=1).expand_as(allowed)):
            return causal, window
    raise ValueError(
        "this layer's attention mask is not one the kernel computes (causal, causal with a sliding window, or "
        "bidirectional, plus padding): e.g. packed sequences in one row, chunked attention, a bidirectional window "
        "or an image-token overlay; use attn_implementation='sdpa' or 'eager' for this model"
    )


def kernel_mask(
    *,
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset,
    kv_offset: int,
    mask_function,
    attention_mask: torch.Tensor | None,
    device,
    use_vmap: bool = False,
    local_size: int | None = None,
    allow_is_causal_skip: bool = True,  # sdpa's shortcut: this function always plans
    allow_is_bidirectional_skip: bool = False,  # the same, for bidirectional masks
    dtype: torch.dtype | None = None,  # eager's additive-mask dtype: no mask is materialized here
    config=None,  # the model's config: everything needed is in the other arguments
    **unknown,
) -> KernelMask:
    """transformers' mask function for our attention (AttentionMaskInterface): plans the kernel calls.

    Called with transformers' description of one forward: batch_size, q_length queries at
    positions q_offset + i, kv_length keys at kv_offset + j, the pattern (mask_function),
    and the 2-D padding mask (batch, positions), True for real tokens, or None.
    """
    if unknown:
        raise ValueError(
            f"transformers passed {', '.join(sorted(unknown))} to the mask function, which kernels.hf does not know; "
            "it supports transformers >=5.4,<6"
        )
    q_offset = int(q_offset)  # a tensor with a static cache
    first_query = q_offset - kv_offset  # the key index of query 0
    if first_query < 0 or first_query + q_length > kv_length:
        raise ValueError(
            f"queries at positions {q_offset}..{q_offset + q_length - 1} are not among the keys at "
            f"{kv_offset}..{kv_offset + kv_length - 1}: kernels.hf serves self-attention over a cache"
        )
    causal, window = _mask_pattern(
        mask_function, local_size, batch_size, q_length, kv_length, q_offset, kv_offset, use_vmap, device
    )
    spec = MaskSpec(causal, window, batch_size, q_length, kv_length, q_offset, kv_offset)
    if isinstance(attention_mask, KernelMask):  # planned ahead by generate() for this very forward
        if attention_mask.spec != spec:
            raise ValueError("the attention mask passed in was planned by kernels.hf for another forward")
        return attention_mask
    if attention_mask is None:
        real = torch.ones(batch_size, kv_length, dtype=torch.bool, device=device)
    else:  # (batch, positions) -> the keys' slots; positions past the mask's end are padding
        padding = masking_utils.prepare_padding_mask(attention_mask.to(torch.bool), kv_length, kv_offset)
        real = padding[:, kv_offset : kv_offset + kv_length]
    if causal:
        # No query sees a key after the last query, so such keys are dropped (with a static cache,
        # its empty slots); a query on a padding token has no output.
        keys = real & (torch.arange(kv_length, device=device) < first_query + q_length)
        queries = real[:, first_query : first_query + q_length]
    else:  # every query sees every real key; none is dropped
        keys = real
        queries = torch.ones(batch_size, q_length, dtype=torch.bool, device=device)
    dense_kv_len = first_query + q_length if causal else kv_length
    if bool(keys[:, :dense_kv_len].all()):
        return KernelMask(spec, dense_kv_len, None)
    if window is not None:
        # Packing a row shortens the distances across a hole in its padding, and the window counts
        # keys by distance: with holes, it would see keys transformers' window hides.
        n_real = keys.sum(1)
        first = keys.int().argmax(1)
        last = kv_length - 1 - keys.flip(1).int().argmax(1)
        if not bool(((n_real == 0) | (last - first + 1 == n_real)).all()):
            raise ValueError(
                "the padding mask has holes inside a row (padding between real tokens) on a sliding-window layer; "
                "pad on the left or right only"
            )
    lengths_q, lengths_k = queries.sum(1), keys.sum(1)
    packing = Packing(
        query_rows=queries.nonzero(as_tuple=True),
        key_rows=keys.nonzero(as_tuple=True),
        cu_seqlens_q=torch.nn.functional.pad(lengths_q.cumsum(0), (1, 0)).to(torch.int32),
        cu_seqlens_k=torch.nn.functional.pad(lengths_k.cumsum(0), (1, 0)).to(torch.int32),
        max_seqlen_q=int(lengths_q.max()),
        max_seqlen_k=int(lengths_k.max()),
    )
    return KernelMask(spec, None, packing)


def _describe(value) -> str:
    return f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    *,
    backend: str,
    name: str,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    output_attentions: bool | None = None,
    **arguments,
) -> tuple[torch.Tensor, None]:
    """transformers' attention function for our kernels (AttentionInterface).

    query (B, Hq, Tq, D), key and value (B, Hkv, Tk, D), attention_mask the KernelMask that
    kernel_mask built for this kind of layer. Returns (B, Tq, Hq, D) and no weights.
    Every argument either reaches the kernel or is refused: none is dropped.
    """
    layer = f"{name} attention in {type(module).__name__} (layer {getattr(module, 'layer_idx', '?')})"
    for argument, given in arguments.items():
        if argument in _UNUSED_ARGUMENTS or given is None:
            continue
        why = _REFUSED_ARGUMENTS.get(argument, "an argument it does not know")
        raise ValueError(f"{layer} cannot honour {argument}={_describe(given)}: {why}")
    if output_attentions:
        raise ValueError(
            f"{layer} returns no attention weights (output_attentions=True); use attn_implementation='eager'"
        )
    mask = attention_mask
    if not isinstance(mask, KernelMask):
        given = "no mask (None)" if mask is None else _describe(mask)
        raise ValueError(
            f"{layer} got {given} instead of the mask kernels.hf builds: a custom 4-D mask, or a model that builds "
            "no mask through transformers' masking utilities, cannot be served; pass a 2-D attention_mask "
            "(1 = token, 0 = padding) or use attn_implementation='sdpa'"
        )
    spec = mask.spec
    shapes = (query.shape[0], query.shape[2], key.shape[2])
    if shapes != (spec.batch_size, spec.q_len, spec.kv_len):
        raise ValueError(
            f"{layer}: q and k have batch {shapes[0]}, q_len {shapes[1]} and kv_len {shapes[2]}, but the mask was "
            f"built for batch {spec.batch_size}, q_len {spec.q_len} and kv_len {spec.kv_len}"
        )
    if is_causal is not None and is_causal != spec.causal:
        raise ValueError(
            f"{layer}: is_causal={is_causal} contradicts its mask, which is {'' if spec.causal else 'not '}causal"
        )
    if sliding_window is not None and sliding_window != spec.window:
        raise ValueError(f"{layer}: sliding_window={sliding_window} contradicts its mask's window ({spec.window})")
    dropout_p = dropout if module.training else 0.0  # eager drops only while the module trains
    options = dict(causal=spec.causal, scale=scaling, window=spec.window, softcap=softcap, dropout_p=dropout_p)
    try:
        if mask.packing is None:
            n = mask.dense_kv_len
            out = kernels.attention(query, key[:, :, :n], value[:, :, :n], backend=backend, **options)
            return out.transpose(1, 2), None  # (B, Tq, Hq, D)
        packing = mask.packing
        # (B, H, T, D) -> (total, H, D): the real tokens, row after row
        q, k, v = (
            t.transpose(1, 2)[rows]
            for t, rows in ((query, packing.query_rows), (key, packing.key_rows), (value, packing.key_rows))
        )
        out = kernels.varlen_attention(
            q,
            k,
            v,
            packing.cu_seqlens_q,
            packing.cu_seqlens_k,
            packing.max_seqlen_q,
            packing.max_seqlen_k,
            backend=backend,
            **options,
        )
    except ValueError as err:  # the kernels' one-line refusals, with the layer named
        raise ValueError(f"{layer}: {err}") from None
    B, Hq, Tq, D = query.shape
    return out.new_zeros(B, Tq, Hq, D).index_put(packing.query_rows, out), None  # padding queries stay 0
