"""Training the GPT on Shakespeare with each attention backend: tokens/s and time to a validation loss.

    GPT_SHAKESPEARE=/path/to/pg100.txt PYTHONPATH=. pytest bench/test_training.py --benchmark-only

Both use gpt.train's own pieces (gpt.step: build_model, configure_optimizer, train_step,
evaluate; gpt.schedule: Schedule) and its settings (gpt.config.TrainConfig), so what is timed is the step
`python -m gpt.train` runs. Every backend gets the same model (same seed), the same batches and
the same schedule. Batches are cut and moved to
the device before timing: the timed work is the optimizer step itself.

* test_train_throughput: median time of one step after warm-up (first steps, Triton
  autotuning and allocator growth excluded); extra_info["tokens_per_s"].
* test_time_to_loss: wall time from a fresh model to the first validation loss <= TARGET_LOSS,
  checking every EVAL_EVERY steps on VAL_WINDOWS validation windows (evaluation included in
  the time: it is the same small cost for every backend). A throwaway model first runs a few
  steps and an evaluation so that compilation and autotuning are not counted.

Configs: "default" is the default run's model, batch and optimizer (Muon + AdamW; extra_info
says which precision Muon's orthogonalization ran in: gpt/muon.py). On CUDA also "long": a wider
model at seqlen 1024, where attention is a larger share of the step.
CUDA trains under bfloat16 autocast (BENCH_TRAIN_DTYPE to change), CPU in float32. On a CPU the
process keeps freed memory between steps, as gpt.train does (gpt/cpu.py).
"""

import dataclasses
import os

import pytest
import torch

import kernels
from bench import common

# Validation loss starts at ~10.4 (ln of the 34k-word vocabulary). On CPU (float32, the default
# batch of 16) the default model is at 6.5 at step 5, 5.4 at step 10 and 4.9 at step 15.
TARGET_LOSS = float(os.environ.get("BENCH_TARGET_LOSS", "7.0" if common.ON_CUDA else "5.0"))
EVAL_EVERY = 5
VAL_WINDOWS = 64
MAX_STEPS = 500 if common.ON_CUDA else 60
TRAIN_DTYPE = os.environ.get("BENCH_TRAIN_DTYPE", "bfloat16" if common.ON_CUDA else "float32")
N_BATCHES = 16  # distinct batches cycled through by the throughput benchmark


def _configs() -> dict:
    from gpt.config import TrainConfig

    default = TrainConfig(dtype=TRAIN_DTYPE, warmup=10)
    if not common.ON_CUDA:
        return {"default": default}
    wide = dataclasses.replace(default.model, d_model=512, n_head=8)
    long = dataclasses.replace(default, seq_len=1024, batch_size=16, model=wide)
    return {"default": default, "long": long}


CONFIG_NAMES = ("default", "long") if common.ON_CUDA else ("default",)


def describe(cfg) -> str:
    model = cfg.model
    heads = f"{model.n_head} heads of {model.d_model // model.n_head}"
    return f"{model.n_layer} layers, d_model {model.d_model}, {heads}, {model.head} head"


@pytest.fixture(scope="session")
def shakespeare():
    from gpt.data import DataError, load_data

    try:
        return load_data(None)  # $GPT_SHAKESPEARE, else the user cache, else a download
    except DataError as err:
        pytest.skip(f"no corpus: {err}")


class Run:
    """Model, optimizer and data of one backend's training run, built outside the timed region."""

    def __init__(self, cfg, backend: str, data, vocab):
        from gpt.config import DTYPES
        from gpt.cpu import keep_freed_memory
        from gpt.step import build_model, configure_optimizer

        self.cfg, self.device = cfg, torch.device(common.DEVICE)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.amp_dtype = DTYPES[cfg.dtype]
        model_config = dataclasses.replace(cfg.model, vocab_size=len(vocab), block_size=cfg.seq_len, attn=backend)
        self.model = build_model(model_config, self.device, seed=cfg.seed)
        self.optimizer = configure_optimizer(self.model, cfg.lr, cfg.weight_decay, self.device, cfg.muon)
        self.batches = [
            tuple(t.to(self.device) for t in data.train_batch(step, cfg.batch_size, cfg.seq_len, cfg.seed))
            for step in range(N_BATCHES)
        ]
        inputs, targets = data.sequences(data.val, cfg.seq_len)
        chosen = torch.linspace(0, len(inputs) - 1, VAL_WINDOWS).round().long()
        self.val = (inputs[chosen], targets[chosen])
        self.step = 0

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.seq_len

    def train_one(self):
        from gpt.schedule import Schedule
        from gpt.step import train_step

        cfg = self.cfg
        lr = Schedule.fixed(cfg.lr, cfg.warmup, MAX_STEPS, cfg.decay).lr(self.step)
        loss = train_step(
            self.model,
            self.optimizer,
            [self.batches[self.step % N_BATCHES]],
            lr=lr,
            grad_clip=cfg.grad_clip,
            amp_dtype=self.amp_dtype,
        )
        self.step += 1
        return loss

    def val_loss(self) -> float:
        from gpt.step import evaluate

        return evaluate(self.model, *self.val, batch_size=self.cfg.batch_size, amp_dtype=self.amp_dtype)


def _skip_unrunnable(backend: str) -> None:
    if backend == "triton" and not common.ON_CUDA:
        pytest.skip(f"{common.INTERPRETER_REASON}; a training step would take hours interpreted")
    reason = common.skip_reason(backend)
    if reason:
        pytest.skip(reason)


def _record(benchmark, cfg, backend: str, metric: str, name: str) -> None:
    from gpt.muon import orthogonalization_dtype

    benchmark.extra_info.update(
        kind="training",
        metric=metric,
        backend=backend,
        config=name,
        model=describe(cfg),
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
        tokens_per_step=cfg.batch_size * cfg.seq_len,
        dtype=cfg.dtype,
        optimizer="Muon + AdamW" if cfg.muon else "AdamW",
        orthogonalization=str(orthogonalization_dtype(common.DEVICE)).removeprefix("torch.") if cfg.muon else None,
        device=common.DEVICE,
        device_name=common.environment()["device_name"],
    )


@pytest.mark.parametrize("backend", kernels.BACKENDS)
@pytest.mark.parametrize("config", CONFIG_NAMES)
def test_train_throughput(benchmark, shakespeare, config, backend):
    _skip_unrunnable(backend)
    cfg = _configs()[config]
    benchmark.group = f"training throughput {config}"
    _record(benchmark, cfg, backend, "throughput", config)
    run = Run(cfg, backend, *shakespeare)
    run.train_one()  # first step: allocations, autotuning; run_benchmark adds one more untimed step
    median = common.run_benchmark(
        benchmark, run.train_one, min_rounds=10 if common.ON_CUDA else 5, max_rounds=200 if common.ON_CUDA else 10
    )
    if median is not None:
        benchmark.extra_info["tokens_per_s"] = run.tokens_per_step / median


@pytest.mark.parametrize("backend", kernels.BACKENDS)
@pytest.mark.parametrize("config", CONFIG_NAMES)
def test_time_to_loss(benchmark, shakespeare, config, backend):
    _skip_unrunnable(backend)
    cfg = _configs()[config]
    benchmark.group = f"training time-to-loss {config}"
    _record(benchmark, cfg, backend, "time_to_loss", config)
    benchmark.extra_info.update(target_loss=TARGET_LOSS, eval_every=EVAL_EVERY, val_windows=VAL_WINDOWS)

    warm = Run(cfg, backend, *shakespeare)  # compile / autotune the shapes of training and evaluation
    for _ in range(2):
        warm.train_one()
    warm.val_loss()
    del warm

    outcome = {}

    def fresh():
        run = Run(cfg, backend, *shakespeare)
        common.synchronize()
        return (run,), {}

    def train_to_target(run):
        val = float("nan")
        while run.step < MAX_STEPS:
            run.train_one()
            if run.step % EVAL_EVERY == 0:
                val = run.val_loss()  # .item() inside: waits for the device
                if val <= TARGET_LOSS:
                    break
        common.synchronize()
        outcome.update(steps=run.step, final_val_loss=val, reached=val <= TARGET_LOSS)

    benchmark.pedantic(train_to_target, setup=fresh, rounds=3 if common.ON_CUDA else 1, warmup_rounds=0, iterations=1)
    benchmark.extra_info.update(outcome)
    if not outcome.get("reached", True):
        pytest.fail(
            f"{backend} did not reach validation loss {TARGET_LOSS} in {MAX_STEPS} steps "
            f"(last {outcome['final_val_loss']:.3f}); lower BENCH_TARGET_LOSS or raise MAX_STEPS"
        )
