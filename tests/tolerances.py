"""How far an attention backend may stray from the float64 reference: the one tolerance table.

The rule (FlashAttention's test practice): compute the exact answer in float64, then
the same thing as plain PyTorch computes it in the backend's own dtype, every step rounded
to that dtype (`kernels.reference.attention(..., upcast=False)`; by default the reference
computes in float32 and is exact). The backend passes if its worst error is at most
ERROR_RATIO times that baseline's worst error, plus a small absolute floor for the dtype:

    max|backend - exact| <= ERROR_RATIO * max|reference_in_dtype - exact| + ABS_FLOOR[dtype]

So the bar scales with how hard the inputs are in that precision, instead of one fixed
tolerance that is loose for easy inputs and fails on hard ones. The floor covers cases
where the reference happens to be nearly exact (e.g. zero gradients), where a ratio
alone would demand the impossible.

One documented exception, `lse_recompute_atol`: gradients of FlashAttention-style
kernels at huge logits, where the reference has an advantage no fused kernel can share.
"""

import math

import torch

ERROR_RATIO = 2.0

ABS_FLOOR = {
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
}


def lse_recompute_atol(max_abs_score: float, grad_magnitude: float) -> float:
    """Extra error allowed in gradients of a kernel that rebuilds softmax from a saved LSE.

    The backward recomputes P = exp2(score * log2(e) - LSE2) with LSE2 a float32 of the
    size of the largest score, so each probability carries a relative error of about
    eps_fp32 * |LSE2|, and a gradient of size G an absolute error of about that times G.
    The reference never pays this (it subtracts the row max in the same precision, and
    autograd reuses the same P), so with scores ~1e4 the ratio rule alone cannot hold.
    For ordinary scores (|s| ~ 10) the term is ~1e-6 * G and changes nothing.
    """
    return torch.finfo(torch.float32).eps * max_abs_score * math.log2(math.e) * grad_magnitude


def max_abs_error(actual: torch.Tensor, expected64: torch.Tensor) -> float:
    """Largest |actual - expected| in float64; inf if actual has NaN/Inf where expected is finite."""
    diff = (actual.detach().double().cpu() - expected64.detach().cpu()).abs()
    return float(torch.nan_to_num(diff, nan=float("inf")).max()) if diff.numel() else 0.0


def assert_close_to_reference(
    name: str, actual: torch.Tensor, expected64: torch.Tensor, baseline: torch.Tensor, extra_atol: float = 0.0
) -> None:
    """Assert `actual` meets the rule above.

    expected64: the float64 reference result; baseline: the reference run in actual's dtype
    with upcast=False;
    extra_atol: a documented allowance on top (see lse_recompute_atol), 0 by default.
    """
    assert actual.shape == expected64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected64.shape)}"
    assert actual.dtype == baseline.dtype, f"{name}: dtype {actual.dtype} != baseline dtype {baseline.dtype}"
    expected64 = expected64.detach().cpu()
    actual_cpu = actual.detach().cpu()
    # Where plain PyTorch in this dtype overflows (float16 scores past 65,504), measure the dtype
    # by rounding the exact answer instead, so the bound stays finite and the test can fail.
    baseline = baseline.detach().cpu()
    baseline = torch.where(torch.isfinite(baseline), baseline, expected64.to(baseline.dtype))
    bad = ~torch.isfinite(actual_cpu) & torch.isfinite(expected64)
    assert not bad.any(), (
        f"{name}: {int(bad.sum())} of {bad.numel()} values are NaN/Inf where the float64 reference is finite, "
        f"first at index {tuple(bad.nonzero()[0].tolist())}"
    )
    err = max_abs_error(actual_cpu, expected64)
    base = max_abs_error(baseline, expected64)
    floor = ABS_FLOOR[actual.dtype]
    bound = ERROR_RATIO * base + floor + extra_atol
    if err > bound:
        diff = torch.nan_to_num((actual_cpu.double() - expected64).abs(), nan=float("inf"))
        index = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(
            f"{name} ({actual.dtype}): max abs error {err:.3e} at index {index} exceeds "
            f"{bound:.3e} = {ERROR_RATIO} * reference-in-{str(actual.dtype).removeprefix('torch.')} error "
            f"{base:.3e} + floor {floor:.0e}" + (f" + extra {extra_atol:.1e}" if extra_atol else "")
        )


# How many units of the computing precision's epsilon (float32 for 16-bit inputs), relative to
# the largest value, the sums and exponentials of an exact-in-dtype computation may add.
ACCUMULATION_EPS = 64


def assert_exact_in_dtype(name: str, actual: torch.Tensor, expected64: torch.Tensor) -> None:
    """Assert `actual` is the exact answer rounded once to its dtype, as a computation in float32
    (float64 for float64) followed by one rounding gives: elementwise

        |actual - exact| <= eps(dtype) * |exact| + ACCUMULATION_EPS * eps(computing dtype) * max|exact|
                            + the dtype's spacing of numbers near 0

    eps * |exact| is at least one unit in the last place, so one rounding always fits; any
    arithmetic done in the dtype itself (float16 scores, bfloat16 probabilities) does not.
    """
    assert actual.shape == expected64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected64.shape)}"
    dtype = actual.dtype
    eps, computing_eps = torch.finfo(dtype).eps, torch.finfo(torch.promote_types(dtype, torch.float32)).eps
    actual = actual.detach().cpu().double()
    expected64 = expected64.detach().cpu()
    largest = float(expected64.abs().max()) if expected64.numel() else 0.0
    underflow = torch.finfo(dtype).smallest_normal * eps  # the dtype's spacing near 0: tinier values round to 0
    bound = eps * expected64.abs() + ACCUMULATION_EPS * computing_eps * largest + underflow
    error = torch.nan_to_num((actual - expected64).abs(), nan=float("inf"))
    excess = error - bound
    if excess.numel() and float(excess.max()) > 0:
        index = tuple(int(i) for i in torch.unravel_index(excess.argmax(), excess.shape))
        raise AssertionError(
            f"{name}: error {float(error[index]):.3e} at index {index} exceeds {float(bound[index]):.3e}, "
            f"the rounding of the exact {float(expected64[index]):.6g} to the dtype"
        )
