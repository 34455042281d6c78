"""Muon (Jordan et al., 2024) for the hidden weight matrices, fast on every CPU.

    optimizer = Muon(matrices, lr=8e-3, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")

The update rule is torch.optim.Muon's, line for line, and so is the state it keeps (one momentum
buffer per matrix), so checkpoints of either load into the other. Per matrix W with gradient G:

    B <- momentum * B + (1 - momentum) * G          the momentum buffer (lerp)
    U <- (1 - momentum) * G + momentum * B          Nesterov: look one step ahead
    O <- orthogonalize(U)                           every singular value of U moved towards 1
    W <- W * (1 - lr * weight_decay) - lr' * O      decoupled weight decay, then the step

where lr' rescales lr by the matrix's shape ("match_rms_adamw": 0.2 sqrt(max(rows, cols)), so that
the update has AdamW's size and one lr serves both optimizers).

The one difference is the precision of orthogonalize(), five Newton-Schulz iterations that are
fifteen small matrix products per matrix per step. torch.optim.Muon always runs them in bfloat16,
which is right on a GPU (tensor cores). On a CPU it is right only where the CPU multiplies
bfloat16 natively (AVX-512 BF16, AMX): on one with AVX2 only, the bfloat16 products are emulated,
tens of times slower than float32 ones, and they took half of the whole training step. On a CPU
these matrices are tiny, and float32 costs little even where bfloat16 is native (docs/recipe.md
has the measurements), so a CPU always orthogonalizes in float32 and a GPU in bfloat16:
`orthogonalization_dtype(device)`.
"""

import torch

# Keller Jordan's quintic Newton-Schulz coefficients (also torch.optim.Muon's defaults): chosen to
# raise small singular values fast rather than to converge exactly; the result's singular values
# land in roughly [0.5, 1.5], which trains as well as an exact orthogonalization.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def orthogonalization_dtype(device: torch.device | str) -> torch.dtype:
    """bfloat16 on GPUs (tensor cores), float32 on CPUs (fast on every instruction set)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def orthogonalize(
    matrix: torch.Tensor,
    dtype: torch.dtype,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    steps: int = NS_STEPS,
    eps: float = 1e-7,
) -> torch.Tensor:
    """The nearest semi-orthogonal matrix to `matrix` (U V^T of its SVD U S V^T), approximately.

    Each iteration maps X to a X + b (X X^T) X + c (X X^T)^2 X, a polynomial in X's singular values
    that pushes them towards 1 while keeping U and V. It converges from singular values <= 1,
    hence the division by the Frobenius norm (an upper bound of the largest one) first.
    Returned in `dtype`; the caller adds it to its float32 weights.
    """
    a, b, c = coefficients
    x = matrix.to(dtype)
    wide = x.T if matrix.size(0) > matrix.size(1) else x  # (short side, long side): X X^T is the small Gram matrix
    x = wide / wide.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T  # (short, short)
        polynomial = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b X X^T + c (X X^T)^2
        x = torch.addmm(x, polynomial, x, beta=a)  # a X + (b X X^T + c (X X^T)^2) X
    return x.T if matrix.size(0) > matrix.size(1) else x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """The learning rate for a (rows, cols) matrix: torch.optim.Muon's two rules."""
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * max(rows, cols) ** 0.5
    return lr * max(1.0, rows / cols) ** 0.5  # "original" (None): Keller Jordan's


class Muon(torch.optim.Muon):
    """torch.optim.Muon with the orthogonalization in `orthogonalization_dtype` of each matrix's
    device (or in `ns_dtype`, if given: torch.bfloat16 reproduces torch.optim.Muon exactly).

    The constructor, its checks, param_groups and state are torch.optim.Muon's; only step() is
    written out here, so that a reader sees the whole rule of the module docstring in one place.
    """

    def __init__(self, params, *args, ns_dtype: torch.dtype | None = None, **kwargs):
        super().__init__(params, *args, **kwargs)
        self.ns_dtype = ns_dtype  # not in param_groups: a setting of this machine, not of the run

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad, state = param.grad, self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                buffer = state["momentum_buffer"]
                buffer.lerp_(grad, 1 - momentum)
                update = grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                dtype = self.ns_dtype or orthogonalization_dtype(param.device)
                update = orthogonalize(update, dtype, group["ns_coefficients"], group["ns_steps"], group["eps"])
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(update, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], param.shape))
        return loss
