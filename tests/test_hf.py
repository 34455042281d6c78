"""kernels.hf: our attention inside tiny random transformers models, against their eager attention.

Each family is built twice from one config and one set of weights, once with
attn_implementation="eager" (transformers' own softmax(q k^T + mask) v, the ground truth)
and once with ours, in float32 on the CPU: logits and every parameter's gradient with and
without left padding, and greedy generation (dynamic and static cache, padded prompts)
must agree, and our kernel must serve every attention call.

The configs make each feature matter: weights 10x larger than transformers' default (sharp
attention, so a wrong mask moves the logits), a sliding window of 3 over 8-token inputs,
a softcap of 1 (Gemma 2's real one, 50, would change nothing at these scores), two kv heads
for four query heads, and scalings other than 1/sqrt(head_dim) (GPT-2's per-layer one,
Gemma 2's query_pre_attn_scalar).

Backends: a backend whose kernels.FEATURES lack something a case needs must refuse it
with the adapter's one-line error; once the backend gains the feature, the same test
checks its numbers instead. Triton runs through its interpreter here (slow), so it gets the
plain model (GPT-2) and the one that needs every feature (Gemma 2).
"""

import copy
import inspect
import subprocess
import sys

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import kernels
import kernels.hf

VOCAB = 100
SMALL = dict(vocab_size=VOCAB, initializer_range=0.2)
LLAMA_LIKE = dict(
    hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)


def _gpt2():
    return transformers.GPT2Config(
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=64,
        scale_attn_by_inverse_layer_idx=True,  # scaling 1 / (sqrt(head_dim) * (layer + 1))
        attn_pdrop=0.0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        **SMALL,
    )


CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**LLAMA_LIKE, **SMALL),
    "gpt2": _gpt2,
    "mistral": lambda: transformers.MistralConfig(**LLAMA_LIKE, sliding_window=3, **SMALL),
    "qwen2": lambda: transformers.Qwen2Config(
        **LLAMA_LIKE,
        sliding_window=3,
        use_sliding_window=True,
        layer_types=["full_attention", "sliding_attention"],
        **SMALL,
    ),
    "gemma2": lambda: transformers.Gemma2Config(
        **LLAMA_LIKE, head_dim=16, sliding_window=3, attn_logit_softcapping=1.0, query_pre_attn_scalar=32, **SMALL
    ),
}
# What each family asks of a backend (kernels.FEATURES); padded batches add "varlen".
NEEDS = {
    "llama": {"gqa"},
    "gpt2": set(),
    "mistral": {"gqa", "window"},
    "qwen2": {"gqa", "window"},
    "gemma2": {"gqa", "window", "softcap"},
}
TRITON_MODELS = ("gpt2", "gemma2")
CASES = [(model, backend) for model in CONFIGS for backend in ("reference", "sdpa")] + [
    (model, "triton") for model in TRITON_MODELS
]
# float32 against float32: two orders of summation, two layers deep (observed: ~5e-6 on logits of size ~5).
TOLERANCE = dict(rtol=1e-4, atol=5e-5)

BATCH, LENGTH, PAD = 2, 8, 3  # row 1 of a padded batch starts with PAD padding tokens


def implementation(backend: str) -> str:
    """Our attention registered with `backend` under a name of its own (one without "sdpa" in it)."""
    return kernels.hf.register(name=f"gpt_kernels_{kernels.BACKEND_CHOICES.index(backend)}", backend=backend)


def models(family: str, attn: str):
    """(ours, eager): the same random weights, each model with its own config (from_config sets the config's
    attention implementation, so a shared config would switch both models)."""
    config = CONFIGS[family]()
    torch.manual_seed(0)
    ours = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=attn).eval()
    eager = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    eager.load_state_dict(ours.state_dict())
    for model in (ours, eager):
        model.generation_config.pad_token_id = 0
    return ours, eager


def batch(padded: bool):
    """Token ids (BATCH, LENGTH) and the 2-D attention mask (1 = token, 0 = padding)."""
    ids = torch.randint(3, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    if padded:
        mask[1, :PAD] = 0
        ids[1, :PAD] = 0
    return ids, mask


class KernelCalls:
    """Counts attention layers' forwards and our kernel's calls (both must match)."""

    def __init__(self, monkeypatch, model):
        self.layers = self.kernel = 0
        self.options = []  # the keyword arguments of each kernel call
        for module in model.modules():
            if type(module).__name__.endswith("Attention"):
                module.register_forward_pre_hook(self._layer)
        for function in ("attention", "varlen_attention"):
            monkeypatch.setattr(kernels, function, self._counted(getattr(kernels, function)))

    def _layer(self, module, args):
        self.layers += 1

    def _counted(self, function):
        def counted(*args, **options):
            self.kernel += 1
            self.options.append(options)
            return function(*args, **options)

        return counted

    def assert_served_all(self):
        assert self.layers > 0 and self.kernel == self.layers, (
            f"our kernel served {self.kernel} of {self.layers} attention calls"
        )


def missing(family: str, backend: str, padded: bool) -> set[str]:
    needs = NEEDS[family] | ({"varlen"} if padded else set())
    return needs - kernels.FEATURES[backend]


def assert_refused(err: pytest.ExceptionInfo, backend: str, lacking: set[str]):
    """The adapter's error for a backend that lacks a feature: one line, naming the layer and the feature."""
    message = str(err.value)
    assert "\n" not in message and "attention in" in message, message
    assert f"not supported by the {backend} backend" in message, message
    assert any(kernels._FEATURE_ARGUMENTS[feature] in message for feature in lacking), message


def logits_and_gradients(model, ids, mask):
    # Position t predicts token t + 1: no loss on padding tokens, nor on predictions made at padding
    # positions (whose outputs are not defined: eager gives an average of arbitrary values, we give 0).
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)
    model.zero_grad()
    out = model(ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    return out.logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("family, backend", CASES)
def test_logits_and_gradients_match_eager(monkeypatch, family, backend, padded):
    ours, eager = models(family, implementation(backend))
    ids, mask = batch(padded)
    calls = KernelCalls(monkeypatch, ours)
    lacking = missing(family, backend, padded)
    if lacking:
        with pytest.raises(ValueError) as err:
            logits_and_gradients(ours, ids, mask)
        assert_refused(err, backend, lacking)
        return
    logits, grads = logits_and_gradients(ours, ids, mask)
    calls.assert_served_all()
    expected_logits, expected_grads = logits_and_gradients(eager, ids, mask)
    real = mask.bool()  # padding tokens' outputs are not defined
    torch.testing.assert_close(logits[real], expected_logits[real], **TOLERANCE)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], **TOLERANCE, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("family, backend", CASES)
def test_greedy_generation_matches_eager(monkeypatch, family, backend, padded, cache):
    ours, eager = models(family, implementation(backend))
    ids, mask = batch(padded)
    calls = KernelCalls(monkeypatch, ours)
    settings = dict(
        attention_mask=mask,
        max_new_tokens=4,
        do_sample=False,
        cache_implementation=cache,
        return_dict_in_generate=True,
        output_logits=True,
    )
    lacking = missing(family, backend, padded)
    if lacking:
        with pytest.raises(ValueError) as err:
            ours.generate(ids, **settings)
        assert_refused(err, backend, lacking)
        return
    out = ours.generate(ids, **settings)
    calls.assert_served_all()
    expected = eager.generate(ids, **settings)
    assert out.sequences.tolist() == expected.sequences.tolist()
    for step, (logits, expected_logits) in enumerate(zip(out.logits, expected.logits)):
        torch.testing.assert_close(logits, expected_logits, **TOLERANCE, msg=lambda m: f"step {step}: {m}")


@pytest.mark.parametrize("prompt", [2, 5], ids=["prompt-within-the-window", "prompt-past-the-window"])
@pytest.mark.parametrize("padded", [False, True], ids=["no-mask", "left-padded-mask-over-every-slot"])
@pytest.mark.parametrize("family, backend", CASES)
def test_empty_static_cache_prefill_and_decode_match_eager(monkeypatch, family, backend, padded, prompt):
    # transformers aligns an empty static cache's prefill top-left: the queries are its first slots,
    # and the empty slots after them are keys too, which only causality hides (with no mask, or
    # with a mask that marks every slot real, as a caller may pass). A sliding-window layer's cache
    # has window slots, so a prompt shorter than the window leaves empty slots there too.
    ours, eager = models(family, implementation(backend))
    ids, mask = batch(padded)
    slots = LENGTH + 4
    mask = torch.cat([mask[:, :prompt], torch.ones(BATCH, slots - prompt, dtype=torch.long)], dim=1) if padded else None
    calls = KernelCalls(monkeypatch, ours)
    lacking = missing(family, backend, padded)
    outputs = []
    for model in (ours, eager):
        # The cache's keyword: `past_key_values` until transformers 5.23, `cache` since 5.24 (5.40 drops the old).
        keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        cache = {keyword: transformers.StaticCache(config=model.config, max_cache_len=slots)}
        if model is ours and lacking:
            with pytest.raises(ValueError) as err:
                model(ids[:, :prompt], attention_mask=mask, **cache)
            return assert_refused(err, backend, lacking)
        prefill = model(ids[:, :prompt], attention_mask=mask, **cache).logits
        decode = model(ids[:, prompt : prompt + 1], attention_mask=mask, **cache).logits
        outputs.append((prefill, decode))
    calls.assert_served_all()
    (prefill, decode), (expected_prefill, expected_decode) = outputs
    real = mask[:, :prompt].bool() if padded else torch.ones(BATCH, prompt, dtype=torch.bool)
    torch.testing.assert_close(prefill[real], expected_prefill[real], **TOLERANCE)
    torch.testing.assert_close(decode, expected_decode, **TOLERANCE)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_padding_with_holes_on_causal_layers_matches_eager(monkeypatch, backend):
    # Packing a row keeps the order of its real tokens, which is all a causal mask needs.
    ours, eager = models("llama", implementation(backend))
    ids, mask = batch(padded=False)
    mask[1, 2:4] = 0
    calls = KernelCalls(monkeypatch, ours)
    logits = ours(ids, attention_mask=mask).logits
    calls.assert_served_all()
    real = mask.bool()
    torch.testing.assert_close(logits[real], eager(ids, attention_mask=mask).logits[real], **TOLERANCE)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_bidirectional_masks_match_eager(monkeypatch, backend):
    # config.is_causal = False turns a decoder into an encoder: every query sees every real key.
    ours, eager = models("llama", implementation(backend))
    for model in (ours, eager):
        model.config.is_causal = False
    ids, mask = batch(padded=True)
    calls = KernelCalls(monkeypatch, ours)
    logits, grads = logits_and_gradients(ours, ids, mask)
    calls.assert_served_all()
    assert all(not options["causal"] for options in calls.options)
    expected_logits, expected_grads = logits_and_gradients(eager, ids, mask)
    torch.testing.assert_close(logits, expected_logits, **TOLERANCE)  # no query is padding-only: all rows defined
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], **TOLERANCE, msg=lambda m: f"grad of {name}: {m}")


def dropout_model(backend: str):
    """GPT-2 whose only dropout is attention dropout, in training mode."""
    config = CONFIGS["gpt2"]()
    config.attn_pdrop = 0.5
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=implementation(backend)).train()


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_attention_dropout_reaches_the_kernel_only_in_training(monkeypatch, padded):
    model = dropout_model("reference")
    ids, mask = batch(padded)
    calls = KernelCalls(monkeypatch, model)
    torch.manual_seed(1)
    first = model(ids, attention_mask=mask).logits
    torch.manual_seed(1)  # the dropout seeds come from PyTorch's generator: the same masks again
    again = model(ids, attention_mask=mask).logits
    other = model(ids, attention_mask=mask).logits  # new seeds
    assert [options["dropout_p"] for options in calls.options] == [0.5] * len(calls.options)
    calls.assert_served_all()
    real = mask.bool()
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(first[real], other[real])
    model.eval()
    calls.options.clear()
    evaluated = model(ids, attention_mask=mask).logits
    assert [options["dropout_p"] for options in calls.options] == [0.0] * len(calls.options)
    assert not torch.allclose(first[real], evaluated[real])


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_attention_dropout_on_triton_drops_what_reference_drops(monkeypatch, padded):
    """The same seeds give the same dropout masks on every backend that has dropout (kernels/dropout.py):
    trained with attention dropout, the triton model's logits and gradients are the reference model's."""
    ids, mask = batch(padded)
    results = []
    for backend in ("reference", "triton"):
        model = dropout_model(backend)
        calls = KernelCalls(monkeypatch, model)
        torch.manual_seed(1)
        results.append(logits_and_gradients(model, ids, mask))
        calls.assert_served_all()
        assert [options["dropout_p"] for options in calls.options] == [0.5] * len(calls.options)
        monkeypatch.undo()
    (logits, grads), (expected_logits, expected_grads) = results[1], results[0]
    real = mask.bool()
    torch.testing.assert_close(logits[real], expected_logits[real], **TOLERANCE)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], **TOLERANCE, msg=lambda m: f"grad of {name}: {m}")


def test_attention_dropout_on_a_backend_without_it_is_refused():
    model = dropout_model("sdpa")
    ids, _ = batch(padded=False)
    with pytest.raises(ValueError) as err:
        model(ids)
    assert_refused(err, "sdpa", {"dropout"})


def test_the_readme_example_loads_a_saved_model_with_the_default_backend(monkeypatch, tmp_path):
    # register() with its defaults, then from_pretrained: "auto" serves Gemma 2's softcap on the CPU
    # (with reference), and set_attn_implementation switches a loaded model back and forth.
    ours, eager = models("gemma2", "eager")
    ours.save_pretrained(tmp_path)
    name = kernels.hf.register()
    assert name == "gpt_kernels"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=name)
    ids, mask = batch(padded=True)
    calls = KernelCalls(monkeypatch, loaded)
    logits = loaded(ids, attention_mask=mask).logits
    calls.assert_served_all()
    real = mask.bool()
    torch.testing.assert_close(logits[real], eager(ids, attention_mask=mask).logits[real], **TOLERANCE)
    loaded.set_attn_implementation("eager")
    loaded(ids, attention_mask=mask)
    assert calls.kernel == calls.layers // 2  # the eager forward did not call our kernel
    loaded.set_attn_implementation(name)
    torch.testing.assert_close(loaded(ids, attention_mask=mask).logits[real], logits[real], rtol=0, atol=0)


def test_importing_kernels_does_not_import_transformers():
    code = "import sys, kernels; kernels.attention; assert 'transformers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# Refusals: each is one line that names the problem.


def one_line_error(err: pytest.ExceptionInfo, *fragments: str):
    message = str(err.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


@pytest.mark.parametrize(
    "arguments, fragment",
    [
        (dict(name="flash_mine"), "must not contain 'flash'"),
        (dict(name="my_sdpa"), "must not contain 'sdpa'"),
        (dict(name="eager"), "must not contain 'eager'"),
        (dict(name="org/kernel"), "must be a Python identifier"),
        (dict(name=3), "must be a Python identifier"),
        (dict(backend="cuda-magic"), "unknown attention backend 'cuda-magic'"),
    ],
)
def test_register_refuses_bad_names_and_backends(arguments, fragment):
    with pytest.raises(ValueError) as err:
        kernels.hf.register(**arguments)
    one_line_error(err, fragment)


TOKENS, _ = batch(padded=False)
HOLES = torch.ones(BATCH, LENGTH, dtype=torch.long)  # padding between real tokens
HOLES[1, 2:4] = 0
PACKED = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]] * BATCH)  # two sequences per row, told by positions alone


@pytest.mark.parametrize(
    "family, call, fragments",
    [
        (
            "llama",
            lambda m: m(TOKENS, attention_mask=torch.ones(BATCH, 1, LENGTH, LENGTH, dtype=torch.bool)),
            ["got a tensor of shape (2, 1, 8, 8)", "custom 4-D mask"],
        ),
        ("llama", lambda m: m(TOKENS, output_attentions=True), ["returns no attention weights"]),
        (
            "llama",
            lambda m: m(TOKENS, position_ids=PACKED, use_cache=False),  # without a cache transformers packs
            ["not one the kernel computes", "packed sequences"],
        ),
        ("mistral", lambda m: m(TOKENS, attention_mask=HOLES), ["holes inside a row", "sliding-window layer"]),
        ("qwen2-bidirectional", lambda m: m(TOKENS), ["not one the kernel computes", "bidirectional window"]),
    ],
    ids=["custom-4d-mask", "output-attentions", "packed-position-ids", "holes-in-a-window", "bidirectional-window"],
)
def test_masks_and_requests_the_kernel_cannot_serve_are_refused(family, call, fragments):
    family, _, bidirectional = family.partition("-")
    config = CONFIGS[family]()
    config.is_causal = not bidirectional
    model = AutoModelForCausalLM.from_config(config, attn_implementation=implementation("reference")).eval()
    with pytest.raises(ValueError) as err:
        call(model)
    one_line_error(err, *fragments)


def test_attention_sinks_are_refused():
    config = transformers.GptOssConfig(
        **LLAMA_LIKE, head_dim=16, num_local_experts=2, num_experts_per_tok=1, sliding_window=3, **SMALL
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation=implementation("reference"))
    with pytest.raises(ValueError) as err:
        model(TOKENS)
    one_line_error(err, "GptOssAttention", "cannot honour s_aux=a tensor of shape (4,)", "attention sinks")


def test_alibi_models_which_compute_attention_themselves_are_refused():
    # Bloom adds its ALiBi bias to the mask in its own attention code, never calling ours.
    config = transformers.BloomConfig(hidden_size=64, n_layer=1, n_head=4, **SMALL)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=implementation("reference"))
    with pytest.raises(ValueError) as err:
        model(TOKENS)
    one_line_error(err, "used the attention mask as a tensor", "computes attention itself")


def causal_mask(q_length=LENGTH, q_offset=0, **unknown):
    """kernels.hf's plan for a plain causal mask over LENGTH keys, as transformers asks for it."""
    return kernels.hf.kernel_mask(
        batch_size=BATCH,
        q_length=q_length,
        kv_length=LENGTH,
        q_offset=q_offset,
        kv_offset=0,
        mask_function=transformers.masking_utils.causal_mask_function,
        attention_mask=None,
        device="cpu",
        **unknown,
    )


def direct_call(module=None, **arguments):
    """Our attention function called as a model calls it, on a plain causal mask; returns (out, q, k, v)."""
    mask = causal_mask()
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(BATCH, heads, LENGTH, 16, generator=generator) for heads in (4, 2, 2))
    options = dict(attention_mask=mask, scaling=0.25) | arguments
    attention = transformers.AttentionInterface()[implementation("reference")]
    out, weights = attention(module or torch.nn.Module(), q, k, v, options.pop("attention_mask"), **options)
    assert weights is None
    return out, q, k, v


def test_the_attention_function_computes_the_kernels_attention():
    out, q, k, v = direct_call(softcap=2.0)
    expected = kernels.attention(q, k, v, scale=0.25, softcap=2.0, backend="reference").transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_dropout_applies_only_while_the_module_trains():
    # As in eager attention, a dropout probability does nothing to a module in evaluation mode.
    evaluating = torch.nn.Module().eval()
    without, *_ = direct_call(evaluating)
    assert torch.equal(direct_call(evaluating, dropout=0.5)[0], without)
    assert not torch.allclose(direct_call(torch.nn.Module().train(), dropout=0.5)[0], without)


@pytest.mark.parametrize(
    "arguments, fragments",
    [
        (dict(position_bias=torch.zeros(1, 4, 8, 8)), ["position_bias=a tensor of shape (1, 4, 8, 8)", "additive"]),
        (dict(alibi=torch.zeros(4, 1, 8)), ["alibi=", "ALiBi"]),
        (dict(head_mask=torch.ones(4)), ["head_mask=", "a head mask"]),
        (dict(sinks=torch.zeros(4)), ["sinks=", "attention sinks"]),
        (dict(cu_seq_lens_q=torch.tensor([0, 8])), ["cu_seq_lens_q=", "packed-sequence"]),
        (dict(temperature=2.0), ["temperature=2.0", "an argument it does not know"]),
        (dict(is_causal=False), ["is_causal=False contradicts its mask, which is causal"]),
        (dict(sliding_window=4), ["sliding_window=4 contradicts its mask's window (None)"]),
        (dict(attention_mask=None), ["got no mask (None)"]),
        (dict(softcap=-1.0), ["softcap must be a finite number > 0"]),
    ],
    ids=lambda value: next(iter(value)) if isinstance(value, dict) else None,
)
def test_arguments_the_kernel_cannot_honour_are_refused(arguments, fragments):
    with pytest.raises(ValueError) as err:
        direct_call(**arguments)
    one_line_error(err, "attention in Module (layer ?)", *fragments)


def test_a_mask_for_other_shapes_is_refused():
    with pytest.raises(ValueError) as err:
        direct_call(attention_mask=causal_mask(q_length=LENGTH - 1, q_offset=1))
    one_line_error(err, "q_len 8 and kv_len 8, but the mask was built for batch 2, q_len 7 and kv_len 8")


def test_the_mask_function_refuses_arguments_it_does_not_know():
    with pytest.raises(ValueError) as err:
        causal_mask(block_sizes=(64, 64))
    one_line_error(err, "passed block_sizes to the mask function", "transformers >=5.4,<6")


def test_a_transformers_release_outside_the_supported_range_is_refused_at_import():
    code = "import transformers; transformers.__version__ = '5.3.0'; import kernels.hf"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "ImportError: kernels.hf needs transformers>=5.4,<6, found 5.3.0; install it with: "
        "pip install 'shakespeare-gpt[hf]'"
    )
