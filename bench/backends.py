"""The attention backends the benchmarks compare, in table order; torch-free, so that bench.report
can read a benchmark JSON without importing torch.

"sdpa" is whatever F.scaled_dot_product_attention picks by itself: the BASELINE every ratio is
taken against. sdpa-* pin one of its CUDA kernels; flex is torch.nn.attention.flex_attention with
a causal block mask, compiled; reference, sdpa and triton are kernels.BACKENDS.
"""

ATTENTION_BACKENDS = ("reference", "sdpa", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "flex", "triton")
CUDA_ONLY_BACKENDS = ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "flex")
BASELINE = "sdpa"
