"""Packed variable-length batches, attended one sequence at a time.

kernels.varlen_attention takes sequences packed back to back, as flash_attn_varlen_func
does: q (total_q, Hq, D) holds sequence s in rows cu_seqlens_q[s]:cu_seqlens_q[s + 1],
and k, v (total_k, Hkv, D) hold its keys and values in rows cu_seqlens_k[s]:cu_seqlens_k[s + 1].
No padding is stored, and no sequence sees another's keys.

The reference and sdpa backends serve it with this loop: one dense attention call per
sequence, on (1, H, T, D) views (no copies). A block-diagonal mask over all total_q x
total_k scores would do the same in one call, at the price of computing and storing every
cross-sequence score only to mask it out: for B equal sequences, B times the work and the
memory. The loop costs one small call per sequence instead, and masks (causal, window)
stay per sequence, aligned bottom-right within each one, exactly as in a dense call.
"""

from collections.abc import Callable

import torch


def by_sequence(
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
) -> torch.Tensor:
    """Packed attention from a dense one: attend(q, k, v, sequence) -> out, on (1, H, T, D) tensors.

    Returns (total_q, Hq, D). A sequence with queries but no keys has nothing to attend
    to: its rows are 0 (FlashAttention's convention). Empty sequences are skipped.
    """
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()  # host copies: the loop needs them
    outs = []
    for s in range(len(starts_q) - 1):
        q_s = q[starts_q[s] : starts_q[s + 1]]  # (Tq_s, Hq, D)
        k_s, v_s = (t[starts_k[s] : starts_k[s + 1]] for t in (k, v))  # (Tk_s, Hkv, D)
        if q_s.shape[0] == 0:
            continue
        if k_s.shape[0] == 0:
            outs.append(q_s.new_zeros(q_s.shape))
            continue
        # (T, H, D) -> (1, H, T, D) views for the dense call, and its output back to (T, H, D)
        out = attend(*(t.transpose(0, 1)[None] for t in (q_s, k_s, v_s)), s)
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs) if outs else q.new_empty(q.shape)
