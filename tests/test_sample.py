"""gpt.sample: text from a checkpoint, reproducible by seed, and one-line errors."""

import pytest
from helpers import error_line, run_module, shakespeare_path, tiny_args, write_corpus

from gpt import sample, train
from gpt.checkpoint import load_checkpoint, restore_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model trained for a few steps on the synthetic corpus."""
    root = tmp_path_factory.mktemp("sample")
    corpus = write_corpus(root / "corpus.txt")
    assert train.main(tiny_args(corpus, root / "out", "--steps", "6")) == 0
    return root / "out" / "ckpt.pt"


def one_line_error(capsys) -> str:
    return error_line(capsys.readouterr().err)


def test_the_command_line_continues_the_prompt(checkpoint):
    result = run_module("gpt.sample", ["--ckpt", str(checkpoint), "--prompt", "The king", "--tokens", "30"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The king") and len(result.stdout) > len("The king\n")
    assert "Traceback" not in result.stderr


def test_the_same_seed_gives_the_same_text(checkpoint, capsys):
    texts = []
    for seed in ("1", "1", "2"):
        assert sample.main(["--ckpt", str(checkpoint), "--prompt", "Thou art", "--tokens", "40", "--seed", seed]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] != texts[2]


def test_complete_returns_the_prompt_and_the_new_tokens(checkpoint):
    model, vocab = restore_model(load_checkpoint(checkpoint))
    text = sample.complete(model, vocab, "Good night", tokens=0)
    assert text == "Good night"
    assert sample.complete(model, vocab, "Good night", tokens=25, top_k=1) == sample.complete(
        model, vocab, "Good night", tokens=25, top_k=1, seed=99
    )  # top-1 is greedy


def test_missing_checkpoint(tmp_path, capsys):
    assert sample.main(["--ckpt", str(tmp_path / "none.pt")]) == 2
    assert "no checkpoint at" in one_line_error(capsys)


def test_corrupt_checkpoint(tmp_path, capsys):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    assert sample.main(["--ckpt", str(path)]) == 2
    assert "not a readable checkpoint" in one_line_error(capsys)


@pytest.mark.parametrize("prompt, message", [("Gandalf speaks", "'Gandalf'"), ("", "the prompt is empty")])
def test_prompt_outside_the_vocabulary(checkpoint, capsys, prompt, message):
    assert sample.main(["--ckpt", str(checkpoint), "--prompt", prompt]) == 2
    assert message in one_line_error(capsys)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--temperature", "nan"], "--temperature must be a finite number >= 0.001, got nan"),
        (["--temperature", "inf"], "--temperature must be a finite number >= 0.001, got inf"),
        (["--temperature", "1e-40"], "got 1e-40; for greedy sampling use --top-k 1"),
        (["--temperature", "0"], "--temperature must be a finite number >= 0.001, got 0.0"),
        (["--top-k", "-1"], "--top-k must be an integer >= 0, got -1; 0 samples among all tokens"),
        (["--tokens", "-1"], "--tokens must be an integer >= 0, got -1"),
        (["--seed", "-1"], "--seed must be an integer >= 0 and <= 4294967295, got -1"),
        (["--seed", str(2**64)], "--seed must be an integer >= 0 and <= 4294967295"),
        (["--device", "meta"], "--device meta: the model runs on cpu, cuda, mps, not meta"),
    ],
)
def test_every_sampling_flag_is_checked(checkpoint, capsys, flags, message):
    assert sample.main(["--ckpt", str(checkpoint), *flags]) == 2
    assert message in one_line_error(capsys)


def test_complete_checks_its_arguments_too(checkpoint):
    model, vocab = restore_model(load_checkpoint(checkpoint))
    with pytest.raises(ValueError, match="--top-k must be an integer >= 1, got 0"):
        sample.complete(model, vocab, "Good night", tokens=5, top_k=0)  # None samples among all tokens
    with pytest.raises(ValueError, match="--temperature must be a finite number >= 0.001, got nan"):
        sample.complete(model, vocab, "Good night", tokens=5, temperature=float("nan"))


def test_unknown_word_from_the_command_line_is_one_line(checkpoint):
    result = run_module("gpt.sample", ["--ckpt", str(checkpoint), "--prompt", "Gandalf"])
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "not in the vocabulary" in result.stderr


def test_the_default_model_trains_on_the_real_corpus_and_speaks_to_romeo(tmp_path, capsys):
    """The default configuration (adaptive head, full vocabulary) for one step, then a sample."""
    out = tmp_path / "out"
    assert (
        train.main(
            [
                "--data",
                str(shakespeare_path()),
                "--out",
                str(out),
                "--device",
                "cpu",
                "--steps",
                "100",
                "--stop-at",
                "1",
                "--batch-size",
                "4",
                "--eval-windows",
                "8",
            ]
        )
        == 0
    )
    state = load_checkpoint(out / "ckpt.pt")
    assert state["model_config"]["head"] == "adaptive" and state["model_config"]["vocab_size"] == 34_216
    capsys.readouterr()
    assert sample.main(["--ckpt", str(out / "ckpt.pt"), "--prompt", "ROMEO.", "--tokens", "20"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO.")
