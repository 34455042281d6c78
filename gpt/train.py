"""Train the GPT on the Complete Works of Shakespeare, on one device or many (torchrun + DDP).

    python -m gpt.train                                   # the default run: see TrainConfig and GPTConfig
    python -m gpt.train --steps 2000 --attn sdpa --dtype bfloat16
    python -m gpt.train --resume                          # continue out/ckpt.pt exactly where it stopped
    torchrun --standalone --nproc_per_node=4 -m gpt.train # DistributedDataParallel, one process per GPU

Writes into --out: metrics.jsonl (one JSON object per log step), ckpt.pt and loss.png, each
written so that a crash at any moment leaves a readable file. SIGINT (Ctrl-C) or SIGTERM saves
a checkpoint after the current step and exits with 128 + the signal number (130, 143); a second
signal exits at once; an evaluation is abandoned at once (it changes nothing), so a signal is
answered within a training step even where evaluating takes minutes (Triton's CPU interpreter).
Expected problems (bad data path, corrupt checkpoint, bad flag values, a model too big for the
machine, another run in --out, a full disk, a diverged loss) end with one line on stderr and exit
code 2, and leave the last good checkpoint as it was.

Reading order: Trainer (set up, loop, evaluate, save), then train() and main(). Around it:
gpt/step.py (one training step, one evaluation), gpt/config.py (the settings and their flags),
gpt/distributed.py (processes), gpt/runfiles.py (the files in --out), gpt/checkpoint.py.
From Python, a whole run is `train(TrainConfig(steps=100))`.
"""

import contextlib
import math
import signal
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import FORMAT, is_current, model_config, restore_model, save_checkpoint
from .cli import resolve_attention, run_program
from .config import DTYPES, TrainConfig, configure
from .cpu import use_cpu
from .data import TokenData, Vocab, load_data
from .distributed import World, setup_world, wrap_for_training
from .errors import RunError
from .footprint import check_memory
from .model import GPT, GPTConfig
from .plot import plot_losses
from .runfiles import (
    CKPT_NAME,
    METRICS_NAME,
    PLOT_NAME,
    Interrupted,
    MetricsLog,
    RunLock,
    StopRequest,
    check_room,
    prepare_out,
    remove_temporaries,
)
from .sample import complete
from .schedule import Schedule, TimeBudget
from .step import build_model, configure_optimizer, evaluate, to_device, train_step

# Validation perplexities on the same split, for comparison at the end of a run.
BASELINES = (("Kneser-Ney trigram", 69.0), ("unigram", 203.0), ("nanoGPT, 15 min", 58.2))
# README's default run (docs/results/train_default_v3/): a machine's speed is compared with it.
REFERENCE_RUN = {"tokens_per_s": 10_800, "tokens": 8.7e6, "val_ppl": 36.71}
# The first speed report comes at the first log step, or after this many seconds of steps if
# that is sooner (a slow machine or Triton's interpreter may take minutes to reach a log step).
FIRST_REPORT_S = 30.0


class Trainer:
    """A training run: data, model, optimizer and progress.

    Trainer.start(cfg, world, device) begins a run; Trainer.resume(cfg, world, device, state)
    continues one from its checkpoint. Then fit() trains, evaluating, logging and saving on the way.
    """

    def __init__(self, cfg: TrainConfig, world: World, device: torch.device, model: GPT, data: TokenData, vocab: Vocab):
        """What a fresh and a resumed run share: everything built around the model, at step 0."""
        if cfg.seq_len > model.config.block_size:
            raise ValueError(f"--seq-len {cfg.seq_len} exceeds the model's block_size {model.config.block_size}")
        if cfg.dtype == "float16" and device.type != "cuda":
            raise ValueError("--dtype float16 needs a CUDA device; on the CPU use bfloat16 or float32")
        self.cfg, self.world, self.device = cfg, world, device
        self.model, self.data, self.vocab = model, data, vocab
        self.amp_dtype = DTYPES[cfg.dtype]
        self.optimizer = configure_optimizer(model, cfg.lr, cfg.weight_decay, device, cfg.muon)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.dtype == "float16")
        self.trained = wrap_for_training(model, world, device, cfg.compile)  # what the training steps call
        self.val_inputs, self.val_targets = TokenData.sequences(data.val, cfg.seq_len)
        self.tokens_per_step = cfg.batch_size * cfg.grad_accum * world.size * cfg.seq_len
        self.step, self.tokens, self.elapsed_before, self.lr = 0, 0, 0.0, None
        self.saved_step: int | None = None  # the step of the checkpoint in --out, if any
        if cfg.steps is not None:
            self.schedule, self.budget = Schedule.fixed(cfg.lr, cfg.warmup, cfg.steps, cfg.decay), None
        else:  # the length is measured as the run goes: see gpt/schedule.py
            self.schedule, self.budget = Schedule(cfg.lr, cfg.warmup, None), TimeBudget(cfg.minutes * 60, cfg.decay)
        self.clock = time.perf_counter  # a test may replace it with a simulated clock
        self.started = self.clock()
        self.speed_reported = False  # the first log step says how fast this machine trains
        self.dropout = None  # the probability the model's dropout layers are set to now

    @classmethod
    def start(cls, cfg: TrainConfig, world: World, device: torch.device) -> "Trainer":
        """A fresh run: the model of cfg.model, sized by the data's vocabulary and --seq-len."""
        attn = resolve_attention(cfg.model.attn, device)
        data, vocab = load_data(cfg.data)
        cfg = replace(cfg, model=replace(cfg.model, vocab_size=len(vocab), block_size=cfg.seq_len))
        check_fits(cfg, cfg.model, world, device)
        model = build_model(replace(cfg.model, attn=attn), device, cfg.seed)
        return cls(cfg, world, device, model, data, vocab)

    @classmethod
    def resume(cls, cfg: TrainConfig, world: World, device: torch.device, state: dict) -> "Trainer":
        """A run continued from its checkpoint: weights, vocabulary, optimizer, scaler and progress."""
        attn = resolve_attention(cfg.model.attn, device)
        check_fits(cfg, model_config(state), world, device)
        model, vocab = restore_model(state, attn=attn, dropout=cfg.model.dropout)
        data, vocab = load_data(cfg.data, vocab)
        trainer = cls(cfg, world, device, model.to(device), data, vocab)
        trainer.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:  # empty when the run so far had no loss scaling
            trainer.scaler.load_state_dict(state["scaler"])
        trainer.step, trainer.tokens, trainer.elapsed_before = state["step"], state["tokens"], state["elapsed_s"]
        trainer.saved_step = state["step"]
        trainer.schedule.load_state_dict(state["schedule"])
        if trainer.budget is not None:
            trainer.budget.load_state_dict(state["budget"])
        return trainer

    # -- one step ----------------------------------------------------------------------------

    def batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This process's micro-batches for `step`.

        The step's global batch is the same set of windows for every (processes x batch size x
        grad accum) with the same product: train_batch splits it disjointly between processes,
        and here each process's share is cut into grad_accum micro-batches.
        """
        cfg = self.cfg
        x, y = self.data.train_batch(
            step, cfg.batch_size * cfg.grad_accum, cfg.seq_len, cfg.seed, self.world.rank, self.world.size
        )
        return [
            (to_device(xb, self.device), to_device(yb, self.device))
            for xb, yb in zip(x.split(cfg.batch_size), y.split(cfg.batch_size))
        ]

    def train_one(self, step: int) -> torch.Tensor:
        # Dropout draws from the global RNG: seeding it from (seed, step, rank) makes every step
        # reproducible on its own, so a resumed run needs no RNG state from the checkpoint.
        torch.manual_seed(hash((self.cfg.seed, step, self.world.rank)) & 0x7FFF_FFFF_FFFF_FFFF)
        self.lr = self.schedule.lr(step)  # for the metrics: a time budget may re-aim the schedule later
        if self.dropout != self.dropout_at(step):
            self.dropout = self.dropout_at(step)
            self.model.set_dropout(self.dropout)
        return train_step(
            self.trained,
            self.optimizer,
            self.batches(step),
            lr=self.lr,
            grad_clip=self.cfg.grad_clip,
            amp_dtype=self.amp_dtype,
            scaler=self.scaler,
        )

    def dropout_at(self, step: int) -> float:
        """Late dropout: none for the first --dropout-after epochs of training data, then --dropout.

        Dropout fights overfitting, which sets in only after a few passes over the data; before
        that it only slows learning down. A slow machine sees fewer than three epochs in 14
        minutes and trains better without any (docs/recipe.md), a fast one sees six and needs it.
        """
        epochs = step * self.tokens_per_step / len(self.data.train)
        return self.cfg.model.dropout if epochs >= self.cfg.dropout_after else 0.0

    def validation_loss(self, windows: int = 0, stop: StopRequest | None = None) -> float | None:
        """Validation loss over `windows` windows spread evenly over the split (0: all of it).
        With `stop`, a signal abandons the evaluation at once and the result is None."""
        inputs, targets = self.val_inputs, self.val_targets
        if 0 < windows < len(inputs):
            chosen = torch.linspace(0, len(inputs) - 1, windows).round().long()
            inputs, targets = inputs[chosen], targets[chosen]
        try:
            with stop.interruptible() if stop is not None else contextlib.nullcontext():
                return evaluate(self.model, inputs, targets, self.cfg.batch_size * self.cfg.grad_accum, self.amp_dtype)
        except Interrupted:
            return None

    # -- the time budget -----------------------------------------------------------------------

    def rebudget(self, since: tuple[float, int]) -> None:
        """--minutes: re-estimate the run's length from the seconds per step since `since` (clock,
        step) on rank 0, and move the schedule's end there; every process gets rank 0's decision."""
        if self.budget is None:
            return
        if self.world.is_main:
            self.budget.observe(self.step - since[1], self.clock() - since[0])
            self.budget.update(self.schedule, self.step, self.elapsed())
        total = self.world.broadcast(self.schedule.total_steps, self.device)
        decaying = self.world.broadcast(self.schedule.decay_start is not None, self.device)
        if decaying:
            self.schedule.start_decay(self.step, total)  # on rank 0 a no-op: it re-aims from the same point
        else:
            self.schedule.total_steps = total

    # -- the loop ------------------------------------------------------------------------------

    def elapsed(self) -> float:
        return self.elapsed_before + self.clock() - self.started

    def checkpoint_state(self) -> dict:
        return {
            "format": FORMAT,
            "model": self.model.state_dict(),
            "model_config": asdict(self.model.config),
            "vocab": self.vocab.state_dict(),
            "train_config": asdict(self.cfg),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "schedule": self.schedule.state_dict(),
            "budget": None if self.budget is None else self.budget.state_dict(),
            "tokens": self.tokens,
            "elapsed_s": self.elapsed(),
        }

    def record(self, train_loss: float | None, val_loss: float | None, tokens_per_s: float | None) -> dict:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_ppl": None if val_loss is None else math.exp(val_loss),
            "tokens_per_s": tokens_per_s,
            "lr": self.lr,  # of the last step
            "elapsed_s": round(self.elapsed(), 3),
        }

    def finished(self) -> bool:
        """Past the schedule's end (unknown until a time budget has measured the speed) or --stop-at."""
        total, stop_at = self.schedule.total_steps, self.cfg.stop_at
        return (total is not None and self.step >= total) or (stop_at is not None and self.step >= stop_at)

    def fit(self, stop: StopRequest, out: Path) -> int:
        """Train to the schedule's end (or --stop-at); returns the exit code (0, or 128 + signal)."""
        cfg, main = self.cfg, self.world.is_main
        log_file = MetricsLog(out / METRICS_NAME, None if self.step == 0 else self.step) if main else None
        total = self.schedule.total_steps
        bar = tqdm(total=total, initial=self.step, unit="step", disable=not main, dynamic_ncols=True)
        # However fit ends, the log is closed and the bar's line ended: an error's line starts on its own.
        with log_file or contextlib.nullcontext() as metrics, bar as progress:
            if self.step == 0:  # the untrained model: about ln(vocab size), the start of the curve
                initial = self.validation_loss(cfg.eval_windows, stop) if main else None  # None: a signal ended it
                self.check_finite(None, initial)
                if initial is not None:
                    metrics.append(self.record(None, initial, None))
            window = (self.clock(), self.step)  # tokens/s is measured over the steps since the last log
            since = window  # the time budget measures everything: steps, evaluations, saves
            stopped, val_loss = self.world.any(stop.signum is not None, self.device), None
            while not self.finished() and not stopped:
                loss = self.train_one(self.step)
                self.step += 1
                self.tokens += self.tokens_per_step
                progress.update()
                is_log = (
                    self.step % cfg.log_interval == 0
                    or self.step % cfg.eval_interval == 0
                    or self.step == self.schedule.total_steps
                    # (one process only: with several, every log step is a collective all must join)
                    or (self.world.size == 1 and not self.speed_reported and self.clock() - window[0] >= FIRST_REPORT_S)
                )
                if is_log:  # the only place the loop waits for the device
                    self.rebudget(since)
                    since, progress.total = (self.clock(), self.step), self.schedule.total_steps
                    val_loss = self.log(loss, window, metrics, progress, out, stop)
                # One process checks the signal flag every step; many agree at log steps only, since
                # agreeing is a collective operation that waits for every process.
                stopped = (
                    self.world.any(stop.signum is not None, self.device) if is_log or self.world.size == 1 else False
                )
                if main and self.step % cfg.ckpt_interval == 0 and not self.finished() and not stopped:
                    self.save(out)
                if is_log:
                    window = (self.clock(), self.step)  # leave evaluation and saving out of tokens/s
            if main:
                self.save(out)
        if main:
            if stopped:
                cause = signal.Signals(stop.signum).name if stop.signum else "a signal to another process"
                print(f"stopped by {cause} after step {self.step}; checkpoint saved, continue with --resume")
            elif self.step == self.schedule.total_steps:
                with contextlib.suppress(Interrupted), stop.interruptible():  # all is saved: a signal may end it
                    self.report(val_loss if val_loss is not None else self.validation_loss())  # None: it had finished
        return stop.exit_code  # 0, or 128 + the signal that stopped it (another process's: 0 here)

    def log(
        self,
        loss: torch.Tensor,
        window: tuple[float, int],
        metrics: MetricsLog | None,
        progress: tqdm,
        out: Path,
        stop: StopRequest,
    ) -> float | None:
        """Average the step's loss over the processes; on rank 0 evaluate when due (the whole
        validation split at the last step), write the metrics line and update the plot.
        Returns the validation loss, or None when there was no evaluation (or a signal ended it)."""
        train_loss = self.world.mean(loss)
        tokens_per_s = (self.step - window[1]) * self.tokens_per_step / (self.clock() - window[0])
        first_report, self.speed_reported = not self.speed_reported, True
        is_last = self.step == self.schedule.total_steps
        val_loss = None
        if self.world.is_main and (self.step % self.cfg.eval_interval == 0 or is_last):
            eval_started = self.clock()
            val_loss = self.validation_loss(0 if is_last else self.cfg.eval_windows, stop)
            if val_loss is not None and self.budget is not None and not is_last:  # the final one covers every window
                share = min(1.0, (self.cfg.eval_windows or len(self.val_inputs)) / len(self.val_inputs))
                self.budget.reserve_s = (self.clock() - eval_started) / share
        self.check_finite(train_loss, val_loss)
        if not self.world.is_main:
            return None
        metrics.append(self.record(train_loss, val_loss, tokens_per_s))
        progress.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")
        if first_report:
            progress.write(self.speed_report(tokens_per_s))
        if val_loss is not None:
            progress.write(
                f"step {self.step}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
                f"val perplexity {math.exp(val_loss):.2f}"
            )
            plot_losses(metrics.records, out / PLOT_NAME)
        return val_loss

    def speed_report(self, tokens_per_s: float) -> str:
        """What the speed measured so far means for this run: how long it takes or how far a time
        budget gets; and, for the default model on a CPU much slower than README's reference run,
        what that does to the result."""
        cfg, step_s = self.cfg, self.tokens_per_step / tokens_per_s
        total = self.schedule.total_steps  # with --minutes, re-estimated from this speed a moment ago
        if self.budget is not None:
            plan = (
                f"the {cfg.minutes:g}-minute budget fits about {total:,} steps "
                f"({total * self.tokens_per_step / 1e6:.1f}M tokens)"
            )
        else:
            plan = f"{total:,} steps take about {(total - self.step) * step_s / 60:.1f} more minutes"
        lines = [f"speed: {tokens_per_s:,.0f} tokens/s ({step_s:.3g} s a step) over the first steps; {plan}"]
        slower = REFERENCE_RUN["tokens_per_s"] / tokens_per_s
        if self.is_default_step() and slower >= 2:
            tokens = total * self.tokens_per_step
            lines.append(
                f"this machine trains the default model {slower:.1f}x slower than README's reference run "
                f"({REFERENCE_RUN['tokens_per_s']:,} tokens/s): this run sees about {tokens / 1e6:.1f}M tokens "
                f"where that one saw {REFERENCE_RUN['tokens'] / 1e6:.1f}M, so expect a higher validation perplexity "
                f"than its {REFERENCE_RUN['val_ppl']} (docs/recipe.md: what the default reaches with fewer tokens)"
            )
        return "\n".join(lines)

    def is_default_step(self) -> bool:
        """Whether a step here is the reference run's step: its model, batch and optimizer, on a CPU."""
        cfg, defaults = self.cfg, TrainConfig()
        same_run = all(
            getattr(cfg, name) == getattr(defaults, name)
            for name in ("batch_size", "seq_len", "grad_accum", "muon", "dtype", "compile")
        )
        model = replace(self.model.config, attn=GPTConfig.attn, dropout=GPTConfig.dropout)
        return same_run and model == GPTConfig() and self.model.config.attn == "sdpa" and self.device.type == "cpu"

    # -- never saving a diverged run -------------------------------------------------------------

    def check_finite(self, train_loss: float | None, val_loss: float | None) -> None:
        """At a log step (where the losses are on the host anyway): a loss that is NaN or inf stops
        the run on every process, before it is logged or its weights saved."""
        losses = (("training loss", train_loss), ("validation loss", val_loss))
        bad = [f"the {what} is {value}" for what, value in losses if value is not None and not math.isfinite(value)]
        if self.world.any(bool(bad), self.device):
            raise self.diverged(bad[0] if bad else "another process's loss is not finite")

    def save(self, out: Path) -> None:
        """Save the checkpoint of this step, unless its weights are not finite: then the run stops
        and the previous checkpoint stays."""
        # One wait for the device: the save that follows waits for it anyway.
        if not torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all():
            raise self.diverged("the weights are not finite")
        save_checkpoint(out / CKPT_NAME, self.checkpoint_state())
        self.saved_step = self.step

    def diverged(self, problem: str) -> RunError:
        cause = f"a learning rate too high for this model (--lr {self.cfg.lr:g})"
        if self.cfg.dtype == "float16":
            cause += " or float16 overflowing (--dtype bfloat16 does not)"
        checkpoint = Path(self.cfg.out) / CKPT_NAME
        kept = (
            f"{checkpoint} still holds step {self.saved_step}; continue it with --resume and a lower --lr"
            if self.saved_step is not None
            else "no checkpoint was saved; start again with a lower --lr"
        )
        return RunError(f"training diverged at step {self.step}: {problem}, likely from {cause}; {kept}")

    def report(self, val_loss: float) -> None:
        """The final result, the baselines, and a sample of the model's writing."""
        print(
            f"val loss {val_loss:.4f}, val perplexity {math.exp(val_loss):.2f} "
            f"(all {len(self.val_inputs):,} validation windows of {self.cfg.seq_len} tokens)"
        )
        print("baselines, val perplexity: " + ", ".join(f"{name} {ppl:g}" for name, ppl in BASELINES))
        prompt = self.vocab.decode(self.data.val[:16])
        print("sample, prompted with the first 16 validation tokens:")
        print(complete(self.model, self.vocab, prompt, tokens=100, seed=self.cfg.seed, device=self.device))

    def describe(self) -> str:
        cfg, config = self.cfg, self.model.config
        threads = torch.get_num_threads()
        threads = f" ({threads} thread{'s' if threads > 1 else ''})" if self.device.type == "cpu" else ""
        return (
            f"model: {self.model.num_parameters():,} parameters (n_layer {config.n_layer}, n_head {config.n_head}, "
            f"d_model {config.d_model}, {config.pos_embedding} positions, {config.head} head"
            f"{', tied embeddings' if config.tie_embeddings else ''}, attention {config.attn}); "
            f"data: {len(self.data.train):,} train / {len(self.data.val):,} val tokens, "
            f"vocabulary {len(self.vocab):,}\n"
            f"device {self.device}{threads}, {cfg.dtype}{', compiled' if cfg.compile else ''}; "
            f"{self.world.size} process(es); "
            f"global batch {cfg.batch_size} x {cfg.grad_accum} x {self.world.size} sequences of {cfg.seq_len} tokens; "
            f"{'Muon + AdamW' if cfg.muon else 'AdamW'}, peak lr {cfg.lr:g}; "
            f"dropout {config.dropout:g} after {cfg.dropout_after:g} epochs"
        )


def check_fits(cfg: TrainConfig, config: GPTConfig, world: World, device: torch.device) -> None:
    """Refuse, before the model is built, a run that cannot fit the device's memory or --out's disk."""
    autocast = DTYPES[cfg.dtype] is not None
    footprint = check_memory(config, device, cfg.batch_size, cfg.seq_len, cfg.grad_accum, autocast)
    if world.is_main:
        check_room(Path(cfg.out), footprint.checkpoint_bytes)


@contextlib.contextmanager
def claim(out: Path, state: dict | None):
    """--out for this run alone, checked before anything is loaded: a directory, writable and
    locked (gpt/runfiles.py), holding no checkpoint for a new run, and for a resumed one still the
    checkpoint `state` was read from (another run may have saved there before the lock was taken)."""
    prepare_out(out)
    with RunLock(out):
        checkpoint = out / CKPT_NAME
        if state is None and checkpoint.exists():
            raise ValueError(f"{checkpoint} exists; continue it with --resume, or choose another --out")
        if state is not None and not is_current(checkpoint, state):
            raise RunError(
                f"{checkpoint} changed while it was being read (another run saved it); run the command again"
            )
        remove_temporaries(out)
        yield


def train(cfg: TrainConfig, state: dict | None = None) -> int:
    """Run (or resume) training as configured; returns the process exit code."""
    world, device = setup_world(cfg.device)
    if device.type == "cpu":
        use_cpu(world.local_size)  # threads for this machine's share of cores; freed memory kept
    try:
        out = Path(cfg.out)
        with claim(out, state) if world.is_main else contextlib.nullcontext(), StopRequest() as stop:
            trainer = Trainer.start(cfg, world, device) if state is None else Trainer.resume(cfg, world, device, state)
            if world.is_main:
                print(trainer.describe())
            if world.is_main:
                budget = trainer.budget is not None
                length = f"{cfg.minutes:g} minutes" if budget else f"{trainer.schedule.total_steps:,} steps"
                print(f"training from step {trainer.step:,} for {length}; writing {out}/")
                if device.type == "cpu" and trainer.model.config.attn == "triton":
                    print(
                        "note: --attn triton on a CPU runs our kernel through Triton's interpreter, which checks "
                        "its results but is hundreds of times slower (minutes per evaluation and per step); "
                        "--attn sdpa trains the same model at full speed"
                    )
            exit_code = trainer.fit(stop, out)
            world.barrier()
            return exit_code
    finally:
        world.close()


def main(argv: list[str] | None = None) -> int:
    # float32 matmuls may use TF32 on GPUs that have it (Ampere and later): several times faster,
    # with a 10-bit mantissa in the products that training does not notice.
    torch.set_float32_matmul_precision("high")
    return run_program(lambda: train(*configure(argv)))


if __name__ == "__main__":
    sys.exit(main())
