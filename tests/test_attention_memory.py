"""Our kernel's memory is O(T): the point of a fused attention kernel, asserted on a GPU.

CUDA only: peak memory is read from torch.cuda's allocator statistics. Interpreted on CPU the
kernel's tiles live in NumPy arrays that no torch statistic sees (bench/test_memory.py measures
what it allocates through torch there).
"""

import pytest
import torch

import kernels
from bench.core import peak_bytes

BATCH, HEADS, HEAD_DIM = 1, 8, 64
SHORT, LONG = 2048, 8192


def peak_bytes_of_forward_backward(backend: str, seqlen: int) -> int:
    """Peak memory of one causal forward + backward beyond its inputs (q, k, v, dout), after a warm-up
    call (autotuning and lazy workspaces are not part of the steady-state peak)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (
        torch.randn(BATCH, HEADS, seqlen, HEAD_DIM, device="cuda", dtype=torch.float16, generator=g) for _ in range(4)
    )
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def forward_backward():
        out = kernels.attention(q, k, v, causal=True, backend=backend)
        return torch.autograd.grad(out, (q, k, v), dout)  # fresh gradients, nothing accumulates

    forward_backward()
    return peak_bytes(forward_backward, "cuda")


@pytest.mark.cuda  # peak GPU memory needs torch.cuda's allocator statistics
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_triton_memory_is_linear(backend):
    """Ours stays O(T): 4x the length costs ~4x the memory, and a handful of (B, H, T, D) tensors.

    The reference runs as a control: the same measurement must see its O(T^2) growth.
    """
    reason = kernels.unavailable_reason(backend, "cuda")
    if reason is not None:
        pytest.skip(reason)
    peaks = {seqlen: peak_bytes_of_forward_backward(backend, seqlen) for seqlen in (SHORT, LONG)}
    growth = peaks[LONG] / max(peaks[SHORT], 1)
    tensor_bytes = BATCH * HEADS * LONG * HEAD_DIM * 2  # one (B, H, T, D) fp16 tensor at the long length
    if backend == "reference":
        assert growth > 10, f"reference should grow ~16x (O(T^2)) from T={SHORT} to {LONG}; measured {growth:.1f}x"
        return
    # out, dq, dk, dv, a float32 dq accumulator, log-sum-exp and delta: well under 16 tensors,
    # while one (B, H, T, T) fp16 score matrix at T=8192 alone is T / (H * D) = 16 tensors' worth per head.
    assert peaks[LONG] <= 16 * tensor_bytes + 8 * 2**20, (
        f"triton fwd+bwd at T={LONG} peaked at {peaks[LONG] / 2**20:.1f} MiB beyond its inputs, "
        f"more than 16 (B, H, T, D) tensors ({16 * tensor_bytes / 2**20:.1f} MiB): not O(T)"
    )
    assert growth < 6, f"triton peak memory grew {growth:.1f}x for 4x the length: not O(T) (linear would be ~4x)"
