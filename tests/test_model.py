"""The GPT model: initial loss, backend interchangeability, causality, cached generation."""

import math

import pytest
import torch

import kernels
from gpt.model import GPT, AdaptiveInput, GPTConfig, Rotary, rotate

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
@pytest.mark.parametrize("pos_embedding", ["learned", "sinusoidal", "rotary"])
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


def test_rotary_rotates_each_pair_by_position_times_frequency():
    """Against the formula written out: pair (i, i + D/2) at position p turns by p / 10000^(2i/D)."""
    config = tiny_config(n_head=2, d_model=16, pos_embedding="rotary")  # head dim 8: 4 pairs
    x = torch.randn(1, 2, 16, 8, dtype=torch.float64)
    positions = torch.arange(16)
    cos, sin = Rotary(config)(positions)
    rotated = rotate(x, (cos.double(), sin.double()))
    expected = torch.empty_like(x)
    for p in range(16):
        for i in range(4):
            angle = p / 10_000 ** (2 * i / 8)
            a, b = x[..., p, i], x[..., p, i + 4]
            expected[..., p, i] = a * math.cos(angle) - b * math.sin(angle)
            expected[..., p, i + 4] = a * math.sin(angle) + b * math.cos(angle)
    torch.testing.assert_close(rotated, expected, rtol=1e-6, atol=1e-6)  # cos/sin tables are float32


def test_rotary_scores_depend_only_on_the_distance():
    config = tiny_config(n_head=1, d_model=8, pos_embedding="rotary")
    rotation = Rotary(config)(torch.arange(16))
    q, k = torch.randn(8), torch.randn(8)

    def score(m: int, n: int) -> torch.Tensor:  # query at position m, key at position n
        return rotate(q, (rotation[0][m], rotation[1][m])) @ rotate(k, (rotation[0][n], rotation[1][n]))

    torch.testing.assert_close(score(5, 2), score(13, 10))
    torch.testing.assert_close(score(3, 3), q @ k)
    assert not torch.allclose(score(5, 2), score(5, 4))


def test_rotary_model_has_no_position_table_and_sees_order():
    torch.manual_seed(0)
    model = GPT(tiny_config(pos_embedding="rotary"))
    assert not any("position_embedding" in name for name, _ in model.named_parameters())
    idx = tokens(1, 16)
    swapped = idx.clone()
    swapped[0, [2, 3]] = idx[0, [3, 2]]
    with torch.no_grad():
        assert (model(swapped)[0][0, -1] - model(idx)[0][0, -1]).abs().max() > 1e-4


def tied_adaptive_model():
    torch.manual_seed(0)
    return GPT(tiny_config(vocab_size=500, head="adaptive", adaptive_cutoffs=[50, 200], tie_embeddings=True))


def test_tied_adaptive_input_reads_the_heads_word_vectors():
    model = tied_adaptive_model()
    assert isinstance(model.token_embedding, AdaptiveInput) and model.token_embedding.head is model.lm_head
    head = model.lm_head
    idx = torch.tensor([[0, 49, 50, 199, 200, 499]])
    vectors = model.token_embedding(idx)
    assert vectors.shape == (1, 6, 32)
    # shortlist: a row of the head's matrix; cluster c: its small vector times its projection
    torch.testing.assert_close(vectors[0, 1], head.head.weight[49])
    project, words = head.tail[0]  # cluster 1: ids 50..199, 32 / 4 = 8 dims
    torch.testing.assert_close(vectors[0, 3], words.weight[149] @ project.weight)
    project, words = head.tail[1]  # cluster 2: ids 200..499, 32 / 16 = 2 dims
    torch.testing.assert_close(vectors[0, 4], words.weight[0] @ project.weight)
    untied = GPT(tiny_config(vocab_size=500, head="adaptive", adaptive_cutoffs=[50, 200], tie_embeddings=False))
    assert untied.num_parameters() - model.num_parameters() == 500 * 32  # the whole table is gone


def test_tied_adaptive_input_gets_gradients_from_both_ends():
    model = tied_adaptive_model()
    rare = 300  # a cluster-2 word: its vector is read as input and scored as output
    idx = torch.full((1, 8), 3)
    idx[0, 2] = rare
    targets = torch.full((1, 8), 4)
    _, loss = model(idx, targets)  # the rare word is only an input here
    loss.backward()
    words = model.lm_head.tail[1][1].weight
    assert words.grad[rare - 200].abs().sum() > 0  # through the input embedding
    assert words.grad[rare - 199].abs().sum() == 0  # no target in cluster 2: its other words get nothing
    model.zero_grad()
    _, loss = model(torch.full((1, 8), 3), torch.full((1, 8), rare))  # now only an output
    loss.backward()
    assert words.grad[rare - 200].abs().sum() > 0


def test_sequence_longer_than_block_size_is_rejected():
    model = GPT(tiny_config())
    with pytest.raises(ValueError, match="exceeds block_size 16"):
        model(tokens(1, 17))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(d_model=30, n_head=4), "divisible by n_head"),
        (dict(pos_embedding="alibi"), "pos_embedding must be"),
        (dict(d_model=30, n_head=2, pos_embedding="rotary"), "must be even"),
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
