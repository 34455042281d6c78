"""gpt/muon.py against torch.optim.Muon: the same rule, with the orthogonalization in float32 on CPUs."""

import pytest
import torch

from gpt.muon import NS_STEPS, Muon, orthogonalization_dtype, orthogonalize

SHAPES = [(384, 128), (128, 512), (64, 64), (3, 7)]  # tall, wide, square, tiny
# How far torch's bfloat16 orthogonalization may be from an exact one: each of its 3 * NS_STEPS
# products is rounded to bfloat16 (unit roundoff 2**-8), and independent roundings add in quadrature.
BF16_ROUNDING = (3 * NS_STEPS) ** 0.5 * 2**-8


def parameters(seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in SHAPES]


def train(optimizer_class, steps: int = 3, **options) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    """`steps` updates of every matrix of SHAPES from the same weights and gradients."""
    params = parameters()
    optimizer = optimizer_class(params, lr=0.02, weight_decay=0.1, **options)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
    return params, optimizer


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr_fn", [None, "match_rms_adamw"])
def test_in_bfloat16_it_is_torch_muon_bit_for_bit(nesterov, adjust_lr_fn):
    """With torch's precision, momentum, Nesterov, weight decay and the lr rules are torch's exactly."""
    options = dict(nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    theirs, their_optimizer = train(torch.optim.Muon, **options)
    ours, our_optimizer = train(Muon, ns_dtype=torch.bfloat16, **options)
    for a, b in zip(theirs, ours):
        assert torch.equal(a, b)
        assert torch.equal(their_optimizer.state[a]["momentum_buffer"], our_optimizer.state[b]["momentum_buffer"])


@pytest.mark.parametrize("shape", SHAPES)
def test_in_float32_the_update_is_torch_muons_up_to_bfloat16_rounding(shape):
    """One step from the same state: the same direction, and a size equal within bfloat16's rounding."""
    generator = torch.Generator().manual_seed(2)
    start, grad = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    updates = {}
    for name, make in (("torch", torch.optim.Muon), ("ours", Muon)):
        param = torch.nn.Parameter(start.clone())
        param.grad = grad.clone()
        make([param], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw").step()
        updates[name] = (param.detach() - start).flatten()
    cosine = torch.nn.functional.cosine_similarity(updates["ours"], updates["torch"], dim=0)
    assert cosine > 1 - BF16_ROUNDING
    assert updates["ours"].norm() / updates["torch"].norm() == pytest.approx(1, abs=BF16_ROUNDING)


@pytest.mark.parametrize("shape", SHAPES)
def test_orthogonalize_pushes_every_singular_value_towards_one(shape):
    generator = torch.Generator().manual_seed(3)
    # Singular values spread over an order of magnitude, as in a gradient.
    u, _, v = torch.linalg.svd(torch.randn(shape, generator=generator), full_matrices=False)
    spread = torch.logspace(0, -1, min(shape))
    matrix = u @ torch.diag(spread) @ v
    result = orthogonalize(matrix, torch.float32)
    assert result.dtype == torch.float32 and result.shape == matrix.shape
    singular = torch.linalg.svdvals(result)
    assert singular.min() > 0.5 and singular.max() < 1.5  # Newton-Schulz's band; the input spanned 0.1..1
    # The singular vectors are kept: the result is (close to) U V^T.
    assert torch.nn.functional.cosine_similarity(result.flatten(), (u @ v).flatten(), dim=0) > 0.95
    # And in float32 it is float64's iteration to float32 precision.
    exact = orthogonalize(matrix.double(), torch.float64)
    torch.testing.assert_close(result.double(), exact, rtol=0, atol=1e-5)


def test_a_cpu_orthogonalizes_in_float32_and_a_gpu_in_bfloat16():
    assert orthogonalization_dtype("cpu") == torch.float32
    assert orthogonalization_dtype(torch.device("cuda", 0)) == torch.bfloat16  # a name: no GPU needed


def test_its_state_is_torch_muons():
    """A checkpoint of one loads into the other: one momentum buffer per matrix, nothing else."""
    _, ours = train(Muon, steps=2, ns_dtype=torch.bfloat16)
    params, theirs = train(torch.optim.Muon, steps=2)
    theirs.load_state_dict(ours.state_dict())
    assert theirs.state_dict()["state"].keys() == ours.state_dict()["state"].keys()
    for key, value in ours.state_dict()["state"].items():
        assert torch.equal(theirs.state_dict()["state"][key]["momentum_buffer"], value["momentum_buffer"])
