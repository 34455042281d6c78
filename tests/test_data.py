"""gpt.data: the corpus, the tokenizer, the vocabulary, the split and the batches.

The tests marked by the `shakespeare` fixture read the real Complete Works: from $GPT_SHAKESPEARE,
else ../shared/data/shakespeare.txt next to the repository. Without either they fail (not skip):
CI must run them.
"""

import pytest
import torch
from helpers import shakespeare_path

from gpt.data import DATA_ENV_VAR, DataError, TokenData, Vocab, load_shakespeare, tokenize
from gpt.model import GPTConfig

START = "*** START OF THE PROJECT GUTENBERG EBOOK THE COMPLETE WORKS OF WILLIAM SHAKESPEARE ***"


@pytest.fixture(scope="module")
def shakespeare() -> tuple[str, Vocab, TokenData]:
    """(text, vocab, data) of the real corpus, loaded once for the module."""
    text = load_shakespeare(shakespeare_path())
    vocab = Vocab.build(tokenize(text))
    return text, vocab, TokenData.from_text(text, vocab)


def numbered(n_tokens: int) -> TokenData:
    """Token data whose ids are their positions, so every window says where it came from."""
    return TokenData(train=torch.arange(n_tokens), val=torch.arange(n_tokens, n_tokens + 100))


# ---------------------------------------------------------------------------------------------
# The real corpus


def test_the_body_is_extracted_without_gutenberg_markers(shakespeare):
    text, _, _ = shakespeare
    assert "*** START OF" not in text and "*** END OF" not in text
    assert "\r" not in text and not text.startswith("\ufeff")
    assert "ROMEO" in text and "To be, or not to be" in text
    assert len(text) > 5_000_000


def test_tokenizing_loses_nothing(shakespeare):
    text, _, _ = shakespeare
    tokens = tokenize(text)
    assert "".join(tokens) == text
    assert tokenize("ROMEO. But, soft!") == ["ROMEO", ". ", "But", ", ", "soft", "!"]


def test_vocabulary_is_sorted_by_frequency_and_matches_the_model_default(shakespeare):
    text, vocab, data = shakespeare
    assert len(vocab) == GPTConfig().vocab_size
    counts = torch.bincount(torch.cat([data.train, data.val]), minlength=len(vocab))
    assert torch.all(counts[:-1] >= counts[1:])  # id 0 is the most common token
    assert Vocab.from_state_dict(vocab.state_dict()).tokens_by_id == vocab.tokens_by_id
    assert vocab.decode(vocab.encode(["ROMEO", ". "])) == "ROMEO. "


def test_split_is_the_first_90_and_last_10_percent(shakespeare):
    text, vocab, data = shakespeare
    everything = torch.cat([data.train, data.val])
    assert len(data.val) == int(len(everything) * 0.1)
    assert vocab.decode(everything[:2000]) == text[: len(vocab.decode(everything[:2000]))]
    assert vocab.decode(data.val[-50:]) == text[-len(vocab.decode(data.val[-50:])) :]


# ---------------------------------------------------------------------------------------------
# Windows and batches


def test_sequences_are_non_overlapping_chunks_with_targets_shifted_by_one():
    inputs, targets = TokenData.sequences(torch.arange(30), seq_len=8)
    assert inputs.shape == targets.shape == (3, 8)  # 3 chunks of 9 tokens: the tail of 3 is dropped
    assert torch.equal(inputs[:, 0], torch.tensor([0, 9, 18]))
    assert torch.equal(targets, inputs + 1)
    assert torch.equal(torch.cat([inputs, targets[:, -1:]], 1).flatten(), torch.arange(27))  # each token once
    shifted, _ = TokenData.sequences(torch.arange(30), seq_len=8, offset=2)
    assert torch.equal(shifted[:, 0], torch.tensor([2, 11, 20]))
    with pytest.raises(ValueError, match="need at least 9 tokens"):
        TokenData.sequences(torch.arange(8), seq_len=8)


def test_train_batch_is_a_pure_function_of_its_arguments():
    data = numbered(10_000)
    a, b = data.train_batch(7, 16, 8, seed=3), data.train_batch(7, 16, 8, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], data.train_batch(7, 16, 8, seed=4)[0])
    assert not torch.equal(a[0], data.train_batch(8, 16, 8, seed=3)[0])


def test_an_epoch_visits_every_chunk_once_from_an_offset_that_moves():
    data = numbered(9 * 64 + 8)  # 64 chunks of 9 tokens fit after any offset in 0..8
    epochs = [
        torch.cat([data.train_batch(step, 8, 8, seed=0)[0] for step in range(8 * e, 8 * e + 8)]) for e in range(4)
    ]  # 8 batches of 8 per epoch
    offsets = set()
    for inputs in epochs:
        starts = inputs[:, 0].sort().values
        offsets.add(int(starts[0]))
        assert torch.equal(starts, starts[0] + 9 * torch.arange(64))  # every chunk once, none overlapping
    assert len(offsets) > 1  # the chunk boundaries move between epochs
    assert not torch.equal(epochs[0][:, 0], epochs[0][:, 0].sort().values)  # shuffled


def test_chunk_starts_mix_word_and_non_word_parity():
    """Tokens alternate word / non-word; a model must see chunks starting at both parities."""
    data = numbered(10_000)
    starts = torch.cat([data.train_batch(step, 16, 64, seed=0)[0][:, 0] for step in range(4)])
    assert 0.3 < (starts % 2).float().mean() < 0.7


def test_ranks_split_the_global_batch_disjointly():
    data = numbered(10_000)
    whole, _ = data.train_batch(5, 12, 8, seed=1)  # one process, 12 windows
    shares = [data.train_batch(5, 4, 8, seed=1, rank=r, world_size=3)[0] for r in range(3)]
    first_tokens = [set(share[:, 0].tolist()) for share in shares]
    assert all(len(s) == 4 for s in first_tokens)
    assert not (
        first_tokens[0] & first_tokens[1] or first_tokens[0] & first_tokens[2] or first_tokens[1] & first_tokens[2]
    )
    assert set().union(*first_tokens) == set(whole[:, 0].tolist())
    with pytest.raises(ValueError, match="exceeds"):
        data.train_batch(0, 10_000, 8, seed=1)


# ---------------------------------------------------------------------------------------------
# Problems with the data file


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist; pass --data"):
        load_shakespeare(tmp_path / "missing.txt")


def test_other_text_is_a_data_error(tmp_path):
    path = tmp_path / "other.txt"
    path.write_text("*** START OF THE PROJECT GUTENBERG EBOOK MOBY DICK ***\nCall me Ishmael.\n*** END OF ***\n")
    with pytest.raises(DataError, match="is not Project Gutenberg eBook #100"):
        load_shakespeare(path)


def test_binary_file_is_a_data_error(tmp_path):
    path = tmp_path / "binary.txt"
    path.write_bytes(b"\xff\xfe\x00\x81 not text")
    with pytest.raises(DataError, match="cannot read data file"):
        load_shakespeare(path)


def test_the_environment_variable_names_the_file(tmp_path, monkeypatch):
    path = tmp_path / "tiny.txt"
    path.write_text(f"header\r\n{START}\r\nROMEO. Hello.\r\n*** END OF THE PROJECT GUTENBERG EBOOK ***\r\n")
    monkeypatch.setenv(DATA_ENV_VAR, str(path))
    assert load_shakespeare() == "ROMEO. Hello.\n"


def test_unknown_words_are_named():
    with pytest.raises(ValueError, match="'Gandalf'"):
        Vocab(["ROMEO", "."]).encode(["ROMEO", "Gandalf"])
