"""gpt.train, gpt.step and gpt.config: schedule, optimizer groups, train_step, flags, outputs of a run,
exact resume, signals, errors.

Most runs use a tiny model on a small synthetic corpus, in this process (fast); the tests of
exit codes and stderr run `python -m gpt.train` in a subprocess. Shared helpers are in
helpers.py, fixtures in conftest.py.
"""

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from helpers import REPO, assert_same_losses, metrics, run_module, start_module, tiny_args, wait_for

from gpt import config, step, train
from gpt.checkpoint import REQUIRED_KEYS, load_checkpoint
from gpt.data import TokenData, load_data
from gpt.model import GPTConfig

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
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
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
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture
def stopped_run(corpus, tmp_path) -> Path:
    """An out/ directory holding the checkpoint of a tiny run stopped after 2 of 4 steps."""
    out = tmp_path / "stopped"
    assert train.main(tiny_args(corpus, out, "--steps", "4", "--stop-at", "2")) == 0
    return out


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
