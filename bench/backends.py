"""The attention backends the benchmarks compare, each registered once, in table order.

A backend is a name, one line saying what it is, and how to run it on one problem:

    make(seqlen, device) -> attn(q, k, v)   causal attention; anything built once per shape
                                            (FlexAttention's block mask and compiled function) is
                                            built here, outside the timed region
    context()                               what its calls run inside (sdpa-* pin one of sdpa's
                                            kernels), entered once around warm-up and timing

    reference       plain PyTorch (kernels.reference), the ground truth
    sdpa            F.scaled_dot_product_attention with its own choice of kernel: the BASELINE
                    of every ratio in the tables (cuDNN on H100/H200)
    sdpa-flash      sdpa pinned to its FlashAttention-2 kernel
    sdpa-efficient  sdpa pinned to its memory-efficient kernel
    sdpa-cudnn      sdpa pinned to cuDNN's fused attention
    flex            torch.nn.attention.flex_attention with a causal block mask, compiled
    triton          our kernel (kernels.attention(..., backend="triton"))
    triton-dq-atomic  our kernel with the single-pass backward (LaunchConfig.dq_atomic: dQ added
                    with atomics inside the dK/dV pass), what deterministic=False launches

A variant of our kernel (the same source launched with other LaunchConfigs, kernels/triton_configs.py)
is one more registration, and then appears in every table next to triton, sdpa, cuDNN and
FlashAttention-2:

    register(triton_variant("triton-128x128", "128 x 128 tiles",
                            lambda kernel, cfg: cfg._replace(block_m=128, block_n=128)))

torch is imported only inside the functions, so that bench.report can read a results file
without it.
"""

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

BASELINE = "sdpa"
PEERS = ("sdpa", "sdpa-cudnn", "sdpa-flash")  # what the kernel table times our kernel and its variants against


class BackendUnavailable(Exception):
    """This backend cannot run here; the message says why."""


@dataclass(frozen=True)
class Backend:
    name: str
    what: str
    make: Callable  # (seqlen, device) -> attn(q, k, v)
    context: Callable = contextlib.nullcontext
    cuda_only: bool = False
    ours: bool = False  # our kernel or a variant of it: interpreted (slowly) without CUDA
    color: str = "tab:cyan"


BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    if backend.name in BACKENDS:
        raise ValueError(f"a benchmark backend named {backend.name!r} is already registered")
    BACKENDS[backend.name] = backend
    return backend


def names(cuda_only: bool | None = None) -> tuple[str, ...]:
    return tuple(n for n, b in BACKENDS.items() if cuda_only is None or b.cuda_only == cuda_only)


def ours() -> tuple[str, ...]:
    """Our kernel and its registered variants."""
    return tuple(n for n, b in BACKENDS.items() if b.ours)


def unavailable_reason(name: str, device) -> str | None:
    """Why `name` cannot run on `device` here, or None if it can."""
    import torch

    import kernels

    backend = BACKENDS[name]
    if backend.cuda_only and torch.device(device).type != "cuda":
        return f"{name} is a CUDA kernel; this run is on {torch.device(device).type}"
    if backend.ours:
        return kernels.unavailable_reason("triton", device)
    return None


def _kernels_backend(name: str) -> Callable:
    def make(seqlen, device):
        import kernels

        return lambda q, k, v: kernels.attention(q, k, v, causal=True, backend=name)

    return make


def _pinned_sdpa(kernel: str) -> Callable:
    """torch.nn.attention.sdpa_kernel pinned to SDPBackend.<kernel>."""

    def context():
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel

        member = getattr(SDPBackend, kernel, None)
        if member is None:
            raise BackendUnavailable(f"this torch ({torch.__version__}) has no SDPBackend.{kernel}")
        return sdpa_kernel(member)

    return context


def _make_flex(seqlen, device):
    import torch

    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as err:
        raise BackendUnavailable(f"this torch ({torch.__version__}) has no FlexAttention: {err}") from None

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    block_mask = create_block_mask(causal, B=None, H=None, Q_LEN=seqlen, KV_LEN=seqlen, device=device)
    # A fresh compile per shape: dynamo's recompile limit would otherwise send later shapes to
    # the (slow, eager) fallback.
    torch._dynamo.reset()
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


def triton_variant(name: str, what: str, change: Callable, color: str = "tab:brown") -> Backend:
    """Our kernel with each launch config the table picks replaced by change(kernel, config),
    kernel being "fwd", "dkdv" or "dq": a LaunchConfig in, the variant's LaunchConfig out.

    The launch goes through a plan of kernels/triton_attention.py with those configs forced, so
    the variant runs the same kernels, launchers and autograd as the default, and nothing else.
    """

    def make(seqlen, device):
        import dataclasses

        import torch

        from kernels import triton_attention
        from kernels.triton_common import Options

        plans = {}

        def attn(q, k, v):
            options = Options(causal=True, scale=q.shape[-1] ** -0.5)
            key = (q.shape, k.shape, q.dtype, q.device)
            if key not in plans:
                plan = triton_attention._plan_for(q, k, v, options)
                configs = {kernel: change(kernel, plan._table_config(kernel)[1]) for kernel in ("fwd", "dkdv", "dq")}
                plans[key] = dataclasses.replace(plan, configs=configs)
            if torch.is_grad_enabled() and q.requires_grad:
                return triton_attention._FlashAttention.apply(q, k, v, options, None, plans[key])
            return triton_attention._forward(q, k, v, options, None, plans[key])[0]

        return attn

    return Backend(name, what, make, ours=True, color=color)


def _single_pass(kernel: str, config):
    """The single-pass backward's config (what deterministic=False launches) for the dK/dV kernel."""
    from kernels import triton_configs

    return triton_configs.single_pass(config) if kernel == "dkdv" else config


register(Backend("reference", "plain PyTorch, explicit mask", _kernels_backend("reference"), color="tab:gray"))
register(
    Backend("sdpa", "F.scaled_dot_product_attention, default dispatch", _kernels_backend("sdpa"), color="tab:blue")
)
for _name, _kernel, _color in (
    ("sdpa-flash", "FLASH_ATTENTION", "tab:orange"),
    ("sdpa-efficient", "EFFICIENT_ATTENTION", "tab:green"),
    ("sdpa-cudnn", "CUDNN_ATTENTION", "tab:purple"),
):
    register(
        Backend(
            _name,
            f"sdpa pinned to SDPBackend.{_kernel}",
            _kernels_backend("sdpa"),
            _pinned_sdpa(_kernel),
            cuda_only=True,
            color=_color,
        )
    )
register(Backend("flex", "FlexAttention, causal block mask, compiled", _make_flex, cuda_only=True, color="tab:red"))
register(
    Backend("triton", "our kernel, the config table's launch", _kernels_backend("triton"), ours=True, color="black")
)


def _forward(**change) -> Callable:
    """A triton_variant change of the forward's config only (the backward keeps the table's)."""
    return lambda kernel, cfg: cfg._replace(**change) if kernel == "fwd" else cfg


# The forward's variants (kernels/triton_configs.py, LaunchConfig): TMA loads, the persistent
# heaviest-first schedule, both; and Hopper tiles the tuner also tries (HOPPER_FORWARD_CANDIDATES):
# FlashAttention-3's 128 x 128 on 8 warps, and BLOCK_M 256 for head dim 64.
register(triton_variant("triton-tma", "forward through TMA tensor descriptors", _forward(tma=True), "tab:olive"))
register(
    triton_variant(
        "triton-persistent", "persistent forward, heaviest tiles first", _forward(persistent=True), "tab:pink"
    )
)
register(
    triton_variant(
        "triton-tma-persistent", "persistent forward through TMA", _forward(tma=True, persistent=True), "teal"
    )
)
register(
    triton_variant(
        "triton-fwd-128x128",
        "forward on 128 x 128 tiles, 8 warps, 2 stages",
        _forward(block_m=128, block_n=128, num_warps=8, num_stages=2),
        "darkgoldenrod",
    )
)
register(
    triton_variant(
        "triton-fwd-256x64",
        "forward on 256 x 64 tiles, 8 warps, 3 stages (a head dim 64 tile)",
        _forward(block_m=256, block_n=64, num_warps=8, num_stages=3),
        "indigo",
    )
)
register(triton_variant("triton-dq-atomic", "our kernel, single-pass backward: dQ by atomic adds", _single_pass))
