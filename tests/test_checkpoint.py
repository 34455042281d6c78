"""Checkpoints prove their integrity: a checksum of their contents is written with them and
verified on load, weights that are not finite are refused, and the previous format still loads."""

import shutil
import struct
import zipfile

import pytest
import torch
from helpers import error_line, tiny_args, write_corpus

from gpt import config, sample, train
from gpt.checkpoint import FORMAT, CheckpointError, checksum, load_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The out/ directory of a tiny model trained for 4 of 8 steps."""
    root = tmp_path_factory.mktemp("checkpoint")
    corpus = write_corpus(root / "corpus.txt")
    assert train.main(tiny_args(corpus, root / "out", "--steps", "8", "--stop-at", "4")) == 0
    return root / "out"


@pytest.fixture
def run(trained, tmp_path):
    """A copy of the trained run, for a test to damage."""
    return shutil.copytree(trained, tmp_path / "out")


def damage_tensor_data(path, n_bytes: int = 4096) -> None:
    """Invert n_bytes in the middle of the largest tensor's data, leaving the file's structure
    (torch.save writes an uncompressed zip, one record per tensor) intact."""
    with zipfile.ZipFile(path) as archive:
        record = max((r for r in archive.infolist() if "/data/" in r.filename), key=lambda r: r.file_size)
    with open(path, "r+b") as file:
        file.seek(record.header_offset + 26)  # the local header's name and extra-field lengths
        name_length, extra_length = struct.unpack("<HH", file.read(4))
        size = min(n_bytes, record.file_size)
        offset = record.header_offset + 30 + name_length + extra_length + (record.file_size - size) // 2
        file.seek(offset)
        data = file.read(size)
        file.seek(offset)
        file.write(bytes(byte ^ 0xFF for byte in data))


def test_a_checkpoint_carries_the_checksum_of_everything_in_it(trained):
    state = load_checkpoint(trained / "ckpt.pt")
    assert state["format"] == FORMAT == 3 and state["checksum"] == checksum(state)
    weight = state["model"]["blocks.0.mlp.up.weight"]
    weight[0, 0] += 1e-3
    assert checksum(state) != state["checksum"]  # one changed weight changes it
    weight[0, 0] -= 1e-3
    state["step"] += 1
    assert checksum(state) != state["checksum"]  # and so does any other value


def test_damaged_tensor_data_is_refused_in_one_line(run, capsys):
    path = run / "ckpt.pt"
    damage_tensor_data(path)
    torch.load(path, weights_only=True)  # the damage torch.load cannot see: the structure is intact
    assert sample.main(["--ckpt", str(path)]) == 2
    error_line(capsys.readouterr().err, f"{path} is damaged", "do not match the checksum")
    with pytest.raises(CheckpointError, match="is damaged"):
        config.configure(["--resume", "--out", str(run)])


def test_weights_that_are_not_finite_are_refused_in_one_line(run, capsys):
    state = load_checkpoint(run / "ckpt.pt")
    state["model"]["blocks.0.attn.qkv.weight"][3, 5] = float("nan")
    save_checkpoint(run / "ckpt.pt", state)  # a valid checksum: what a diverged run of an older version saved
    assert sample.main(["--ckpt", str(run / "ckpt.pt")]) == 2
    error_line(
        capsys.readouterr().err, "weights are not finite", "blocks.0.attn.qkv.weight", "use an earlier checkpoint"
    )
    assert train.main(["--resume", "--out", str(run)]) == 2
    error_line(capsys.readouterr().err, "weights are not finite")


def test_a_format_2_checkpoint_still_loads_and_resumes_as_format_3(run, capsys):
    """Format 2 is format 3 without the checksum: there is nothing to verify it against, so it
    loads as it did; its run's next save writes format 3."""
    state = load_checkpoint(run / "ckpt.pt")
    del state["checksum"]
    torch.save({**state, "format": 2}, run / "ckpt.pt")
    assert load_checkpoint(run / "ckpt.pt")["format"] == 2
    assert sample.main(["--ckpt", str(run / "ckpt.pt"), "--prompt", "The king", "--tokens", "5"]) == 0
    assert train.main(["--resume", "--out", str(run), "--stop-at", "6"]) == 0
    assert load_checkpoint(run / "ckpt.pt")["format"] == 3
