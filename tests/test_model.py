"""The GPT model: initial loss, backend interchangeability, causality, cached generation."""

import math

import pytest
import torch

import kernels
from gpt.model import GPT, GPTConfig

ALL_BACKENDS = kernels.BACKENDS  # triton runs through Triton's interpreter on CPU


def tiny_config(**overrides) -> GPTConfig:
    settings = dict(
        vocab_size=97, block_size=16, n_layer=2, n_head=2, d_model=32, attn="reference", head="full", dropout=0.0
    )
    settings.update(overrides)
    return GPTConfig(**settings)


def tokens(batch=2, length=16, vocab=97, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_initial_loss_is_close_to_uniform_guess():
    """Small init makes every word about equally likely: loss ~ ln(vocab_size)."""
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=1000))
    idx = tokens(4, 16, 1000)
    _, loss = model(idx, tokens(4, 16, 1000, seed=1))
    assert abs(loss.item() - math.log(1000)) < 0.05


def test_adaptive_head_is_a_normalized_distribution_and_its_loss_matches_it():
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=500, head="adaptive", adaptive_cutoffs=[50, 200]))
    idx, targets = tokens(2, 16, 500), tokens(2, 16, 500, seed=1)
    log_probs, _ = model(idx)  # (B, T, vocab)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(2, 16))
    logits, loss = model(idx, targets)
    assert logits is None
    expected = -log_probs.gather(-1, targets[..., None]).mean()
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize(
    "backend,dtype,tol",
    [
        ("sdpa", torch.float64, 1e-10),
        ("sdpa", torch.float32, 2e-5),
        ("triton", torch.float32, 2e-5),  # the kernel computes in float32 at most; float64 is rejected
    ],
)
def test_swapping_the_backend_keeps_logits_and_gradients(backend, dtype, tol):
    torch.manual_seed(0)
    reference = GPT(tiny_config(attn="reference")).to(dtype)
    other = GPT(tiny_config(attn=backend)).to(dtype)
    other.load_state_dict(reference.state_dict())
    idx, targets = tokens(), tokens(seed=1)
    results = []
    for model in (reference, other):
        model.zero_grad()
        logits, _ = model(idx)
        _, loss = model(idx, targets)
        loss.backward()
        results.append((logits, loss, {n: p.grad for n, p in model.named_parameters()}))
    (logits_a, loss_a, grads_a), (logits_b, loss_b, grads_b) = results
    torch.testing.assert_close(logits_b, logits_a, rtol=tol, atol=tol)
    torch.testing.assert_close(loss_b, loss_a, rtol=tol, atol=tol)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_changing_token_t_never_changes_outputs_before_t(backend):
    torch.manual_seed(0)
    model = GPT(tiny_config(attn=backend)).eval()
    idx = tokens(1, 12)
    t = 7
    changed = idx.clone()
    changed[0, t] = (idx[0, t] + 1) % 97
    with torch.no_grad():
        before, _ = model(idx)
        after, _ = model(changed)
    torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-6)
    assert (after[:, t:] - before[:, t:]).abs().max() > 1e-3  # and position t onward does see it


def test_without_the_mask_earlier_outputs_do_change():
    """The control for the test above: causal=False lets the future leak backwards."""
    torch.manual_seed(0)
    model = GPT(tiny_config(causal=False)).eval()
    idx = tokens(1, 12)
    changed = idx.clone()
    changed[0, 7] = (idx[0, 7] + 1) % 97
    with torch.no_grad():
        assert (model(changed)[0][:, :7] - model(idx)[0][:, :7]).abs().max() > 1e-3


@pytest.mark.parametrize("head", ["full", "adaptive"])
@pytest.mark.parametrize("pos_embedding", ["learned", "sinusoidal"])
def test_cached_generation_equals_uncached(head, pos_embedding):
    """Past block_size the window slides, so this also covers rebuilding the cache."""
    torch.manual_seed(0)
    model = GPT(tiny_config(head=head, adaptive_cutoffs=[20, 50], pos_embedding=pos_embedding)).eval()
    prompt = tokens(2, 5)
    cached = model.generate(prompt, 30, use_cache=True, generator=torch.Generator().manual_seed(3))
    uncached = model.generate(prompt, 30, use_cache=False, generator=torch.Generator().manual_seed(3))
    assert cached.shape == (2, 35)
    assert torch.equal(cached, uncached)


def test_top_k_one_is_greedy():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    prompt = tokens(1, 4)
    out = model.generate(prompt, 1, top_k=1)
    with torch.no_grad():
        logits, _ = model(prompt)
    assert out[0, -1] == logits[0, -1].argmax()


def test_weight_sharing_reuses_one_block():
    shared = GPT(tiny_config(n_layer=4, share_blocks=True))
    separate = GPT(tiny_config(n_layer=4))
    block_params = sum(p.numel() for p in separate.blocks[0].parameters())
    assert separate.num_parameters() - shared.num_parameters() == 3 * block_params
    assert shared.blocks[0] is shared.blocks[3]


def test_tied_embeddings_share_one_matrix():
    model = GPT(tiny_config(tie_embeddings=True))
    assert model.lm_head.weight is model.token_embedding.weight


def test_sequence_longer_than_block_size_is_rejected():
    model = GPT(tiny_config())
    with pytest.raises(ValueError, match="exceeds block_size 16"):
        model(tokens(1, 17))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(d_model=30, n_head=4), "divisible by n_head"),
        (dict(pos_embedding="rotary"), "pos_embedding must be"),
        (dict(head="adaptive", tie_embeddings=True), "tie_embeddings needs head='full'"),
        (dict(attn="flash"), "unknown attention backend"),
    ],
)
def test_bad_config_is_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_a_few_training_steps_follow_the_reference_loss_curve(backend):
    curves = []
    for attn in ("reference", backend):
        torch.manual_seed(0)
        model = GPT(tiny_config(attn=attn))
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        idx, targets = tokens(), tokens(seed=1)  # one batch, seen 5 times: the loss must fall
        for _ in range(5):
            _, loss = model(idx, targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        curves.append(losses)
    assert curves[0][-1] < curves[0][0] - 0.05  # the curve does go down
    torch.testing.assert_close(torch.tensor(curves[1]), torch.tensor(curves[0]), rtol=1e-4, atol=1e-4)


def test_adaptive_head_trains_under_bfloat16_autocast():
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=500, head="adaptive", adaptive_cutoffs=[50, 200]))
    idx, targets = tokens(2, 16, 500), tokens(2, 16, 500, seed=1)
    _, expected = model(idx, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(idx, targets)
        log_probs, _ = model(idx)
    loss.backward()
    assert loss.dtype == torch.float32 and log_probs.dtype == torch.float32
    assert abs(loss.item() - expected.item()) < 0.05  # bfloat16 body, float32 head
