#!/usr/bin/env bash
# Rerun every experiment behind docs/first_principles.md; results go to docs/results/.
# About 10 minutes on a 2-core CPU. The Shakespeare ones read $GPT_SHAKESPEARE (or the cached download).
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1  # the models are tiny: on a shared 2-core machine a second thread mostly adds contention
for experiment in scaling attention_scores share_blocks residual positions; do
    python docs/experiments/$experiment.py
done
python -m gpt.reverse --attn reference --out docs/results/reverse
python -m gpt.reverse --attn reference --no-mask --out docs/results/reverse_no_mask
