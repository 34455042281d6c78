"""The reversal task: a causal model learns the reversed half and is at chance on the unseen half;
without the mask it cheats on both."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import error_line

from gpt import reverse

STEPS = 150  # the default is 1000; 70 steps reach >= 0.9996 on seeds 0-3 (40 do not), so 150 leaves a margin

pytestmark = pytest.mark.usefixtures("one_thread")


def test_examples_are_digits_separator_reversed_digits_shifted_by_one():
    inputs, targets = reverse.reversal_examples(torch.tensor([[3, 1, 4, 1, 5]]))
    sep = reverse.SEPARATOR
    assert inputs.tolist() == [[3, 1, 4, 1, 5, sep, 5, 1, 4, 1]]
    assert targets.tolist() == [[1, 4, 1, 5, sep, 5, 1, 4, 1, 3]]
    groups = reverse.target_groups(5)
    assert targets[0, groups["first_half"]].tolist() == [1, 4, 1, 5]  # digits 2..n: not seen yet
    assert targets[0, groups["separator"]].tolist() == [sep]
    assert targets[0, groups["second_half"]].tolist() == [5, 1, 4, 1, 3]  # all seen before the separator
    assert reverse.position_labels(5) == ["in2", "in3", "in4", "in5", "|", "out1", "out2", "out3", "out4", "out5"]


def test_training_batches_are_seeded_and_never_contain_a_held_out_sequence():
    settings = reverse.ReverseSettings(n_digits=4, batch_size=500)  # 10^4 sequences: 10% are held out
    held_out = {tuple(row) for row in reverse.held_out_digits(4).tolist()}
    batches, again = reverse.training_batches(settings), reverse.training_batches(settings)
    for _ in range(5):
        inputs, targets = next(batches)
        assert inputs.shape == targets.shape == (500, 8)
        assert torch.equal(inputs, next(again)[0])
        assert not held_out & {tuple(row) for row in inputs[:, :4].tolist()}


def run_cli(tmp_path, *flags):
    assert reverse.main(["--steps", str(STEPS), "--seed", "0", "--out", str(tmp_path), *flags]) == 0
    return json.loads((tmp_path / "reverse.json").read_text())


def test_causal_model_reverses_but_cannot_predict_unseen_digits(tmp_path, capsys):
    result = run_cli(tmp_path, "--attn", "reference")
    assert len(result["per_position_accuracy"]) == 16
    assert result["chance"] == 0.1
    assert result["second_half_accuracy"] >= 0.95
    assert abs(result["first_half_accuracy"] - result["chance"]) < 0.03  # 7000 guesses: std 0.004
    assert "second half" in capsys.readouterr().out


def test_without_the_mask_the_model_reads_the_answer_and_cheats(tmp_path):
    result = run_cli(tmp_path, "--attn", "sdpa", "--no-mask")
    assert result["first_half_accuracy"] >= 0.95
    assert result["second_half_accuracy"] >= 0.95
    assert result["settings"]["causal"] is False


@pytest.mark.parametrize(
    "flags",
    [
        ["--attn", "flash"],
        ["--steps", "0"],
        ["--n-digits", "2"],
        ["--lr", "-1"],
        ["--pos-embedding", "alibi"],
        ["--device", "nonsense"],
        ["--batch-size", "x"],
        ["--seed", str(2**64)],
        ["--lr", "inf"],
        ["--lr", "nan"],
        ["--device", "meta"],
        ["--batch-size", str(2**40)],  # does not fit the machine's memory
    ],
)
def test_invalid_flags_exit_2_with_one_line(tmp_path, capsys, flags):
    try:
        code = reverse.main(["--out", str(tmp_path), *flags])
    except SystemExit as exit_info:  # argparse's own errors (unknown choice, not a number) exit right away
        code = exit_info.code
    assert code == 2
    error_line(capsys.readouterr().err)


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_a_bad_out_is_refused_before_training_so_no_result_is_lost(tmp_path, capsys, where):
    a_file = tmp_path / "a_file"
    a_file.write_text("a user's file\n")
    out = a_file if where == "a file" else a_file / "out"
    # A million steps: the error must come before any of them (they would take hours).
    assert reverse.main(["--out", str(out), "--steps", "1000000"]) == 2
    error_line(capsys.readouterr().err, f"--out {out}")
    assert a_file.read_text() == "a user's file\n"


def test_invalid_flag_from_the_shell_prints_no_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "gpt.reverse", "--out", str(tmp_path), "--n-digits", "99"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["error: --n-digits must be an integer >= 4 and <= 18, got 99"]
