"""gpt.train, gpt.step and gpt.config: schedule, optimizer groups, train_step, flags, outputs of a run,
exact resume, signals, errors.

Most runs use a tiny model on a small synthetic corpus, in this process (fast); the tests of
exit codes and stderr run `python -m gpt.train` in a subprocess. Shared helpers are in
helpers.py, fixtures in conftest.py.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from helpers import (
    REPO,
    assert_same_losses,
    error_line,
    metrics,
    run_module,
    start_module,
    tiny_args,
    wait_for,
    write_corpus,
)

from gpt import config, step, train
from gpt.checkpoint import REQUIRED_KEYS, load_checkpoint, save_checkpoint
from gpt.config import TrainConfig
from gpt.data import TokenData, load_data
from gpt.distributed import World
from gpt.errors import RunError
from gpt.model import GPTConfig
from gpt.muon import Muon
from gpt.runfiles import Interrupted, StopRequest

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# The pieces


def test_every_flag_has_one_line_of_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    options = config.run_options() + config.model_options()
    for f in options:
        assert config.flag(f.name) in help_text
        assert f.metadata["help"]
    # Every setting but the model's size-by-the-run fields is a flag, and each is declared once.
    names = [f.name for f in options]
    assert len(names) == len(set(names))
    assert set(names) == (set(config.TrainConfig.__dataclass_fields__) - {"model"}) | (
        set(GPTConfig.__dataclass_fields__) - set(config.SET_BY_THE_RUN)
    )


def test_model_flags_come_from_gpt_config_and_default_to_its_defaults():
    cfg, state = config.configure(["--head", "full", "--no-causal", "--adaptive-cutoffs", "10", "20"])
    assert state is None
    assert cfg.model == GPTConfig(head="full", causal=False, adaptive_cutoffs=[10, 20])
    assert config.configure([])[0] == config.TrainConfig()


def small_model(head: str = "full", tie: bool = False) -> nn.Module:
    model_config = GPTConfig(
        vocab_size=64,
        block_size=8,
        n_layer=2,
        n_head=2,
        d_model=16,
        head=head,
        tie_embeddings=tie,
        adaptive_cutoffs=[8, 32],
    )
    return step.build_model(model_config, "cpu", seed=0)


@pytest.mark.parametrize("head, tie", [("full", False), ("full", True), ("adaptive", False), ("adaptive", True)])
def test_weight_decay_only_on_linear_weight_matrices(head, tie):
    model = small_model(head, tie)
    decayed, not_decayed = step.configure_optimizer(model, 1e-3, 0.1, "cpu").param_groups
    assert decayed["weight_decay"] == 0.1 and not_decayed["weight_decay"] == 0.0
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    embeddings = {id(p) for p in model.token_embedding.parameters()}  # tied: the output layer's too
    assert {id(p) for p in decayed["params"]} == linear_weights - embeddings
    assert all(p.dim() == 2 for p in decayed["params"])
    everything = decayed["params"] + not_decayed["params"]
    assert len(everything) == len({id(p) for p in everything}) == len(list(model.parameters()))
    if tie and head == "adaptive":  # the adaptive head is the embedding: nothing of it decays
        assert not {id(p) for p in model.lm_head.parameters()} & {id(p) for p in decayed["params"]}


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = small_model("adaptive", tie=True)
    optimizer = step.configure_optimizer(model, 1e-3, 0.1, "cpu", muon=True)
    muon, adamw = optimizer.optimizers
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    in_blocks = {id(m.weight) for m in model.blocks.modules() if isinstance(m, nn.Linear)}
    assert len(in_blocks) == 2 * 4  # qkv, proj, up, down per block
    assert {id(p) for group in muon.param_groups for p in group["params"]} == in_blocks
    adamw_params = [p for group in adamw.param_groups for p in group["params"]]
    assert not {id(p) for p in adamw_params} & in_blocks
    assert len(adamw_params) + len(in_blocks) == len(list(model.parameters()))
    assert muon.param_groups[0]["weight_decay"] == 0.1
    # One step through train_step moves both kinds, and the state round-trips.
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    step.train_step(model, optimizer, [(x, x.roll(-1, 1))], lr=1e-2)
    assert not torch.equal(before["blocks.0.attn.qkv.weight"], model.blocks[0].attn.qkv.weight)
    assert not torch.equal(before["lm_head.head.weight"], model.lm_head.head.weight)
    again = step.configure_optimizer(small_model("adaptive", tie=True), 1e-3, 0.1, "cpu", muon=True)
    again.load_state_dict(optimizer.state_dict())
    assert again.optimizers[0].state_dict()["state"].keys() == muon.state_dict()["state"].keys()


def test_gradient_accumulation_equals_one_big_batch():
    model_config = GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, d_model=16, head="full", dropout=0.0)
    x = torch.randint(0, 50, (8, 8), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 50, (8, 8), generator=torch.Generator().manual_seed(1))
    results = []
    for micro_batches in (
        [(x, y)],
        [(x[:4], y[:4]), (x[4:], y[4:])],
        [(x[i : i + 2], y[i : i + 2]) for i in range(0, 8, 2)],
    ):
        model = step.build_model(model_config, "cpu", seed=0)
        # SGD: the update is the gradient itself (Adam's first step, ~lr * sign(gradient),
        # would magnify the rounding differences of near-zero gradients).
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        loss = step.train_step(model, optimizer, micro_batches, lr=1.0, grad_clip=1.0)
        assert loss.dim() == 0
        results.append((loss.item(), torch.cat([p.flatten() for p in model.parameters()])))
    for loss, params in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-5)
        torch.testing.assert_close(params, results[0][1], rtol=1e-5, atol=1e-6)


def test_train_config_validation_names_the_option():
    with pytest.raises(ValueError, match="--batch-size must be an integer >= 1, got 0"):
        config.TrainConfig(batch_size=0).validate()
    with pytest.raises(ValueError, match="dropout must be in"):
        GPTConfig(dropout=1.0)
    with pytest.raises(ValueError, match="n_layer must be positive"):
        config.configure(["--n-layer", "0"])
    config.TrainConfig().validate()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
        (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
        (["--lr", "0"], "--lr must be a finite number > 0"),
        (["--weight-decay", "inf"], "--weight-decay must be a finite number >= 0, got inf"),
        (["--grad-clip", "nan"], "--grad-clip must be a finite number >= 0, got nan"),
        (["--minutes", "inf"], "--minutes must be a finite number > 0 and <= 1000000, got inf"),
        (["--minutes", "nan"], "--minutes must be a finite number"),
        (["--decay", "nan"], "--decay must be a finite number >= 0 and <= 1, got nan"),
        (["--warmup", "-1"], "--warmup must be an integer >= 0"),
        (["--eval-windows", "-1"], "--eval-windows must be an integer >= 0"),
        (["--seed", "-1"], "--seed must be an integer >= 0 and <= 4294967295"),
        (["--steps", str(2**63)], "--steps must be an integer >= 1 and <= 9223372036854775807"),
        (["--stop-at", "0"], "--stop-at must be an integer >= 1"),
        (["--dropout", "nan"], "dropout must be in [0, 1), got nan"),
    ],
)
def test_every_numeric_flag_is_finite_and_in_range(flags, message):
    with pytest.raises(ValueError) as error:
        config.configure(flags)
    assert message in str(error.value)


def test_a_non_finite_flag_is_refused_on_resume_too(stopped_run, capsys):
    before = (stopped_run / "ckpt.pt").read_bytes()
    assert train.main(["--resume", "--out", str(stopped_run), "--lr", "inf"]) == 2
    error_line(capsys.readouterr().err, "--lr must be a finite number > 0, got inf")
    assert (stopped_run / "ckpt.pt").read_bytes() == before


# ---------------------------------------------------------------------------------------------
# A whole run


def test_run_writes_metrics_checkpoint_plot_and_a_final_report(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    assert train.main(tiny_args(corpus, out, "--steps", "8")) == 0
    stdout = capsys.readouterr().out

    records = metrics(out)
    assert [r["step"] for r in records] == [0, 2, 4, 6, 8]
    for record in records:
        assert set(record) == {"step", "tokens", "train_loss", "val_loss", "val_ppl", "tokens_per_s", "lr", "elapsed_s"}
        assert record["tokens"] == record["step"] * 8 * 16
        if record["val_loss"] is not None:
            assert record["val_ppl"] == pytest.approx(math.exp(record["val_loss"]))
    assert [r["val_loss"] is not None for r in records] == [True, False, True, False, True]
    data, vocab = load_data(str(corpus))
    assert records[0]["val_loss"] == pytest.approx(math.log(len(vocab)), rel=0.1)  # untrained: ~ln(vocab)
    assert records[-1]["val_loss"] < records[0]["val_loss"]

    state = load_checkpoint(out / "ckpt.pt")
    assert set(REQUIRED_KEYS) <= set(state)
    assert state["step"] == state["schedule"]["total_steps"] == 8 and state["budget"] is None
    assert state["model_config"]["block_size"] == 16 and state["model_config"]["attn"] == "sdpa"
    assert state["train_config"]["batch_size"] == 8
    assert not any(key.startswith(("_orig_mod", "module")) for key in state["model"])  # the unwrapped model

    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert not list(out.glob("*.tmp"))

    # The final evaluation covers the whole validation split.
    n_windows = len(TokenData.sequences(data.val, 16)[0])
    final = records[-1]["val_loss"]
    assert f"val loss {final:.4f}, val perplexity {math.exp(final):.2f} (all {n_windows:,} validation windows" in stdout
    assert "Kneser-Ney trigram 69" in stdout and "unigram 203" in stdout and "58.2" in stdout
    assert "sample" in stdout


@pytest.mark.parametrize(
    "options",
    [
        ["--dropout", "0.0"],
        ["--dropout", "0.2"],
        ["--dropout", "0.2", "--dropout-after", "0.015"],  # dropout switches on at step 4, where the run halves
        [
            "--muon",
            "--pos-embedding",
            "rotary",
            "--head",
            "adaptive",
            "--adaptive-cutoffs",
            "8",
            "16",
            "--tie-embeddings",
        ],
    ],
)
def test_resume_reproduces_an_uninterrupted_run(corpus, tmp_path, options):
    flags = ["--steps", "8", *options]
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    assert train.main(tiny_args(corpus, whole, *flags)) == 0
    assert train.main(tiny_args(corpus, halves, *flags, "--stop-at", "4")) == 0
    assert load_checkpoint(halves / "ckpt.pt")["step"] == 4
    # Lines past the checkpoint (a run that died after logging) and a line cut by a crash are dropped.
    with open(halves / "metrics.jsonl", "a") as file:
        file.write(json.dumps({"step": 6, "train_loss": 1.0, "val_loss": None}) + '\n{"step": 7, "tra')
    assert train.main(["--resume", "--out", str(halves)]) == 0  # the other settings come from the checkpoint
    assert_same_losses(metrics(whole), metrics(halves))
    a, b = load_checkpoint(whole / "ckpt.pt"), load_checkpoint(halves / "ckpt.pt")
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=0, atol=0)


def test_the_first_steps_say_how_fast_this_machine_trains(corpus, tmp_path, capsys):
    """A machine so slow that the first log step is far off reports its speed after FIRST_REPORT_S
    seconds of steps, with what it means for the run (simulated clock: 4 s a step)."""
    flags = ["--steps", "20", "--log-interval", "50", "--eval-interval", "50"]  # no log step before step 20
    cfg, _ = config.configure(tiny_args(corpus, tmp_path / "out", *flags))
    trainer = train.Trainer.start(cfg, World(), torch.device("cpu"))
    now = [0.0]
    trainer.clock, trainer.started = (lambda: now[0]), 0.0
    real_train_one = trainer.train_one

    def slow_train_one(step: int) -> torch.Tensor:
        now[0] += 4.0
        return real_train_one(step)

    trainer.train_one = slow_train_one
    (tmp_path / "out").mkdir()
    with StopRequest() as stop:
        assert trainer.fit(stop, tmp_path / "out") == 0
    first = math.ceil(train.FIRST_REPORT_S / 4)  # the first step that ends FIRST_REPORT_S into training
    logged = [record["step"] for record in metrics(tmp_path / "out")]
    assert logged[:2] == [0, first]  # then the regular log steps
    per_step = 8 * 16  # batch x seq_len
    out = capsys.readouterr().out
    assert f"speed: {per_step / 4:,.0f} tokens/s (4 s a step) over the first steps; " in out
    assert f"20 steps take about {(20 - first) * 4 / 60:.1f} more minutes" in out
    assert out.count("speed:") == 1


def test_a_machine_slower_than_the_reference_is_told_what_it_means(corpus, tmp_path):
    """Only the default model's step is compared with README's reference run."""
    default = train.Trainer.start(TrainConfig(out=str(tmp_path)), World(), torch.device("cpu"))
    default.schedule.total_steps = 1000  # what --minutes would have estimated from this speed
    reference = train.REFERENCE_RUN["tokens_per_s"]
    slow = default.speed_report(reference / 4)
    assert "the 14-minute budget fits about 1,000 steps (2.0M tokens)" in slow
    assert "4.0x slower than README's reference run" in slow
    assert f"about 2.0M tokens where that one saw {train.REFERENCE_RUN['tokens'] / 1e6:.1f}M" in slow
    assert "slower" not in default.speed_report(reference / 1.5)  # within a factor of 2: no warning
    cfg, _ = config.configure(tiny_args(corpus, tmp_path / "tiny", "--steps", "20"))
    tiny = train.Trainer.start(cfg, World(), torch.device("cpu"))
    assert "slower" not in tiny.speed_report(1.0)  # another model: nothing to compare with


def test_triton_on_a_cpu_says_up_front_that_it_is_interpreted(corpus, tmp_path, capsys):
    assert train.main(tiny_args(corpus, tmp_path / "out", "--steps", "2", "--attn", "triton")) == 0
    assert "note: --attn triton on a CPU runs our kernel through Triton's interpreter" in capsys.readouterr().out


def test_dropout_switches_on_after_the_given_epochs(corpus, tmp_path):
    cfg, _ = config.configure(tiny_args(corpus, tmp_path / "out", "--dropout", "0.2", "--dropout-after", "0.015"))
    trainer = train.Trainer.start(cfg, World(), torch.device("cpu"))
    switch = math.ceil(0.015 * len(trainer.data.train) / trainer.tokens_per_step)  # 128 tokens a step
    assert switch == 4
    dropout_layers = [m for m in trainer.model.modules() if isinstance(m, nn.Dropout)]
    assert len(dropout_layers) == 1 + 2 * cfg.model.n_layer  # embeddings, then attention and MLP outputs
    for n in range(6):
        trainer.train_one(n)
        assert {m.p for m in dropout_layers} == {0.0 if n < switch else 0.2}


def test_minutes_resume_continues_the_measured_schedule(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    assert train.main(tiny_args(corpus, out, "--minutes", "0.05", "--stop-at", "4")) == 0
    assert "for 0.05 minutes" in capsys.readouterr().out
    first = load_checkpoint(out / "ckpt.pt")
    assert first["schedule"]["total_steps"] > 4 and first["budget"]["step_s"] > 0  # measured at the log steps
    assert train.main(["--resume", "--out", str(out), "--stop-at", "6"]) == 0
    state = load_checkpoint(out / "ckpt.pt")
    assert state["step"] == 6 and state["elapsed_s"] > first["elapsed_s"]
    with pytest.raises(ValueError, match="--minutes cannot change"):
        config.configure(["--resume", "--out", str(out), "--minutes", "3"])


def test_resume_cannot_change_the_model_shape_or_the_step_budget(corpus, tmp_path):
    out = tmp_path / "out"
    assert train.main(tiny_args(corpus, out, "--steps", "4", "--stop-at", "2")) == 0
    with pytest.raises(ValueError, match="--d-model cannot change when resuming"):
        config.configure(["--resume", "--out", str(out), "--d-model", "64"])
    with pytest.raises(ValueError, match="--steps cannot change"):
        config.configure(["--resume", "--out", str(out), "--steps", "9"])
    with pytest.raises(ValueError, match="--causal cannot change"):
        config.configure(["--resume", "--out", str(out), "--no-causal"])
    cfg, state = config.configure(["--resume", "--out", str(out), "--lr", "0.01", "--dropout", "0.2"])
    assert cfg.lr == 0.01 and cfg.model.d_model == 32 and cfg.model.dropout == 0.2 and state["step"] == 2


# ---------------------------------------------------------------------------------------------
# Signals and errors, as a user sees them


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_and_exits_with_128_plus_signal(corpus, tmp_path, signum):
    out = tmp_path / "out"
    process = start_module("gpt.train", tiny_args(corpus, out, "--steps", "100000", "--ckpt-interval", "100000"))
    try:
        wait_for(lambda: len(metrics(out)) >= 2 if (out / "metrics.jsonl").exists() else False, what="training")
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr
    assert "checkpoint saved" in stdout
    state = load_checkpoint(out / "ckpt.pt")
    assert 2 <= state["step"] < 100000
    assert all(r["step"] <= state["step"] for r in metrics(out))


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    error_line(result.stderr, *fragments)


def test_error_missing_data(tmp_path):
    result = run_module("gpt.train", ["--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "out")])
    assert_one_line_error(result, "does not exist")


def test_error_unknown_backend(tmp_path):
    assert_one_line_error(run_module("gpt.train", ["--attn", "cuda-magic"]), "invalid choice", "--attn")


def test_error_triton_kernel_unavailable(corpus, tmp_path):
    # Simulate a machine where the kernel cannot be imported (no Triton, or a broken install).
    code = (
        "import sys; sys.modules['kernels.triton_attention'] = None; from gpt.train import main; "
        f"sys.exit(main({tiny_args(corpus, tmp_path / 'out', '--attn', 'triton')!r}))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert_one_line_error(result, "--attn triton is unavailable")


def test_error_seq_len_above_block_size_when_resuming(stopped_run):
    result = run_module("gpt.train", ["--resume", "--out", str(stopped_run), "--seq-len", "32"])
    assert_one_line_error(result, "--seq-len 32 exceeds the model's block_size 16")


def test_error_corrupt_checkpoint(stopped_run):
    path = stopped_run / "ckpt.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert_one_line_error(run_module("gpt.train", ["--resume", "--out", str(stopped_run)]), "not a readable checkpoint")


def test_error_resume_without_checkpoint_and_overwrite_protection(stopped_run, tmp_path, corpus):
    assert_one_line_error(run_module("gpt.train", ["--resume", "--out", str(tmp_path / "empty")]), "no checkpoint at")
    result = run_module("gpt.train", tiny_args(corpus, stopped_run, "--steps", "4"))
    assert_one_line_error(result, "exists; continue it with --resume")


def test_error_device_without_data(tmp_path, capsys):
    # meta tensors have shapes but no data: nothing could train there.
    assert train.main(["--out", str(tmp_path / "out"), "--device", "meta"]) == 2
    error_line(capsys.readouterr().err, "--device meta: the model runs on cpu, cuda, mps, not meta")


@pytest.mark.parametrize(
    "flags",
    [
        ["--d-model", "1000000"],
        ["--seq-len", "1000000000000"],
        ["--n-layer", "100000000"],
        ["--batch-size", str(2**40)],
    ],
)
def test_error_a_model_that_does_not_fit_is_refused_before_it_is_allocated(corpus, tmp_path, capsys, flags):
    started = time.monotonic()
    assert train.main(tiny_args(corpus, tmp_path / "out", "--steps", "4", *flags)) == 2
    line = error_line(capsys.readouterr().err, "this run needs at least", "but cpu has", "GiB")
    assert "TiB" in line or "PiB" in line or "EiB" in line  # far beyond this machine
    assert time.monotonic() - started < 30  # refused, not attempted
    assert not (tmp_path / "out" / "ckpt.pt").exists()


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody may write to: a read-only tmpfs as root (who may write anywhere else),
    else a directory without write permission."""
    path = tmp_path / "read_only"
    path.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)]).returncode != 0:
            pytest.skip("root here cannot mount a tmpfs, and root may write into any directory")
        yield path
        subprocess.run(["umount", str(path)], check=True)
    else:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)


@pytest.mark.parametrize("where", ["a file", "under a file", "read-only", "under read-only"])
def test_error_bad_out_is_reported_before_the_data_is_loaded(tmp_path, capsys, request, where):
    a_file = tmp_path / "a_file"
    a_file.write_text("a user's file\n")
    read_only = request.getfixturevalue("read_only_dir") if "read-only" in where else None
    out, message = {
        "a file": (a_file, "exists and is not a directory"),
        "under a file": (a_file / "out", "cannot create the directory"),
        "read-only": (read_only, "is not writable"),
        "under read-only": (read_only and read_only / "out", "cannot create the directory"),
    }[where]
    # The data path does not exist: had the data been loaded first, the error would say so.
    assert train.main(["--data", str(tmp_path / "nope.txt"), "--out", str(out), "--device", "cpu"]) == 2
    error_line(capsys.readouterr().err, f"--out {out}", message)
    assert a_file.read_text() == "a user's file\n"


def test_error_metrics_that_are_a_directory_on_resume(stopped_run, capsys):
    (stopped_run / "metrics.jsonl").unlink()
    (stopped_run / "metrics.jsonl").mkdir()
    assert train.main(["--resume", "--out", str(stopped_run)]) == 2
    error_line(capsys.readouterr().err, "metrics.jsonl is not a file")
    assert load_checkpoint(stopped_run / "ckpt.pt")["step"] == 2


def test_error_metrics_with_a_line_that_is_not_ours_on_resume(stopped_run, capsys):
    path = stopped_run / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "[1, 2, 3]", *lines[1:]]) + "\n")
    before = path.read_bytes()
    assert train.main(["--resume", "--out", str(stopped_run)]) == 2
    error_line(capsys.readouterr().err, "metrics.jsonl line 2 is not a metrics record", "remove that line")
    assert path.read_bytes() == before  # the user's file, untouched
    assert load_checkpoint(stopped_run / "ckpt.pt")["step"] == 2


def test_error_resume_from_a_checkpoint_another_run_replaced_meanwhile(stopped_run):
    """configure() reads the checkpoint before train() takes the lock: if another run saved in
    between, this one must not continue from the stale copy and overwrite the newer one."""
    cfg, state = config.configure(["--resume", "--out", str(stopped_run)])
    newer = load_checkpoint(stopped_run / "ckpt.pt")
    save_checkpoint(stopped_run / "ckpt.pt", {**newer, "step": 3, "elapsed_s": newer["elapsed_s"] + 1})
    with pytest.raises(RunError, match="changed while it was being read"):
        train.train(cfg, state)
    assert load_checkpoint(stopped_run / "ckpt.pt")["step"] == 3


# ---------------------------------------------------------------------------------------------
# A run that diverges: stopped in one line, the last good checkpoint kept, the log standard JSON


def test_a_learning_rate_that_diverges_stops_the_run_and_keeps_the_last_good_checkpoint(stopped_run):
    """The user's story: a good run stopped at step 2, resumed with a learning rate far too high.
    Its loss is NaN at the next log step (4): the run stops there, in one line on its own below
    the progress bar, and neither the checkpoint nor metrics.jsonl gets anything non-finite."""
    good = load_checkpoint(stopped_run / "ckpt.pt")
    result = run_module("gpt.train", ["--resume", "--out", str(stopped_run), "--lr", "1e30", "--stop-at", "4"])
    assert result.returncode == 2, result.stderr
    line = error_line(result.stderr, "training diverged at step 4", "--lr 1e+30", "still holds step 2")
    before = result.stderr.split(line)[0]
    assert "step/s" in before and before.endswith("\n")  # a progress bar came first, and its line ended
    state = load_checkpoint(stopped_run / "ckpt.pt")
    assert state["step"] == 2
    for name, tensor in good["model"].items():
        torch.testing.assert_close(state["model"][name], tensor, rtol=0, atol=0)
    assert [r["step"] for r in metrics(stopped_run)] == [0, 2]  # standard JSON, and nothing of the bad steps
    assert not list(stopped_run.glob("*.tmp"))
    # The fix the message gives works: the same resume with the old learning rate.
    assert train.main(["--resume", "--out", str(stopped_run), "--stop-at", "4"]) == 0


def tiny_trainer(corpus: Path, out: Path, *extra: str) -> train.Trainer:
    cfg, _ = config.configure(tiny_args(corpus, out, "--steps", "4", *extra))
    out.mkdir()
    return train.Trainer.start(cfg, World(), torch.device("cpu"))


def test_weights_that_are_not_finite_are_never_saved(corpus, tmp_path):
    """A step can break the weights while its own loss (computed before the update) is fine: the
    save itself refuses them."""
    trainer = tiny_trainer(corpus, tmp_path / "out")
    trainer.save(tmp_path / "out")
    saved = (tmp_path / "out" / "ckpt.pt").read_bytes()
    trainer.step = 3
    with torch.no_grad():
        trainer.model.blocks[0].mlp.up.weight[0, 0] = float("inf")
    with pytest.raises(RunError, match="diverged at step 3: the weights are not finite.*still holds step 0"):
        trainer.save(tmp_path / "out")
    assert (tmp_path / "out" / "ckpt.pt").read_bytes() == saved


def test_a_non_finite_validation_loss_stops_the_run_before_it_is_logged(corpus, tmp_path):
    trainer = tiny_trainer(corpus, tmp_path / "out")
    with pytest.raises(RunError, match="diverged at step 0: the validation loss is nan.*no checkpoint was saved"):
        trainer.check_finite(1.0, float("nan"))
    trainer.check_finite(1.0, None)  # no evaluation at this log step


# ---------------------------------------------------------------------------------------------
# Responsive on Ctrl-C and SIGTERM even when evaluating takes long (Triton's CPU interpreter)


def test_a_signal_during_an_evaluation_stops_it_at_once_and_saves_the_last_step(tmp_path):
    """The first evaluation of the untrained model runs every validation window through Triton's
    interpreter: tens of seconds here. SIGTERM in the middle of it is answered within seconds,
    with the checkpoint of the last completed step (0) and exit code 143."""
    corpus = write_corpus(tmp_path / "corpus.txt", n_lines=20_000)  # ~2,500 validation windows
    out = tmp_path / "out"
    args = tiny_args(corpus, out, "--attn", "triton", "--steps", "100", "--eval-windows", "0")
    process = start_module("gpt.train", args, env={"PYTHONUNBUFFERED": "1"})
    try:
        wait_for(lambda: process.stdout.readline().startswith("training from step 0"), what="the run to start")
        time.sleep(1.0)  # inside the evaluation now
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
        answered_s = time.monotonic() - signalled
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    assert "stopped by SIGTERM after step 0; checkpoint saved" in stdout
    assert answered_s < 10, answered_s  # the whole evaluation takes several times longer
    assert load_checkpoint(out / "ckpt.pt")["step"] == 0
    assert metrics(out) == []  # the evaluation never finished, so it logged nothing


def test_interruptible_work_ends_at_the_signal_and_other_work_at_the_step():
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)  # outside: only noted, the step goes on
        assert stop.signum == signal.SIGINT
        with pytest.raises(Interrupted):  # inside, after a signal: ends at once
            with stop.interruptible():
                pytest.fail("interruptible work started after a signal")
    with StopRequest() as stop:
        with pytest.raises(Interrupted):
            with stop.interruptible():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
                pytest.fail("the signal did not end the work")
        assert stop.exit_code == 128 + signal.SIGTERM
