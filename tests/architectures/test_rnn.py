"""RNNEncoder: variable-length sequences give the same features alone and in a padded batch."""

import pytest
import torch

from lightning_mtl.architectures import RNNEncoder

LENGTHS = [5, 1, 9, 3, 9, 7]


def padded_batch(lengths=LENGTHS, features=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    sequences = [torch.randn(n, features, generator=g) for n in lengths]
    padded = torch.full((len(lengths), max(lengths), features), 123.0)  # garbage padding must not matter
    for i, sequence in enumerate(sequences):
        padded[i, : len(sequence)] = sequence
    return sequences, padded


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("pooling", ["last", "mean", "max"])
def test_mixed_lengths_equal_one_by_one(cell, bidirectional, pooling):
    torch.manual_seed(0)
    encoder = RNNEncoder(4, 6, cell=cell, num_layers=2, bidirectional=bidirectional, pooling=pooling).eval()
    sequences, padded = padded_batch()
    batched = encoder((padded, torch.tensor(LENGTHS)))
    alone = torch.cat([encoder(sequence.unsqueeze(0)) for sequence in sequences])
    assert batched.shape == (len(LENGTHS), encoder.out_features)
    assert encoder.out_features == (12 if bidirectional else 6)
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-6)


def test_lengths_as_a_list_and_full_lengths_match_the_plain_tensor():
    encoder = RNNEncoder(4, 6, pooling="mean").eval()
    _, padded = padded_batch([7, 7, 7])
    torch.testing.assert_close(encoder([padded, [7, 7, 7]]), encoder(padded))


def test_image_columns_layout_reads_pixel_columns_left_to_right():
    encoder = RNNEncoder(12, 5, input_layout="image_columns").eval()
    images = torch.rand(3, 1, 12, 20)
    columns = images[:, 0].transpose(1, 2)  # (B, 20 steps, 12 features)
    plain = RNNEncoder(12, 5)
    plain.load_state_dict(encoder.state_dict())
    torch.testing.assert_close(encoder(images), plain.eval()(columns))


def test_gradients_flow_through_packed_sequences_only_from_valid_steps():
    encoder = RNNEncoder(4, 6, pooling="max")
    _, padded = padded_batch()
    padded.requires_grad_(True)
    encoder((padded, LENGTHS)).sum().backward()
    for i, n in enumerate(LENGTHS):
        assert padded.grad[i, n:].abs().sum() == 0
    assert all(p.grad is not None for p in encoder.parameters())


@pytest.mark.parametrize(
    "lengths, error, match",
    [
        ([5, 0, 9, 3, 9, 7], ValueError, r"`lengths` must be >= 1; sequence\(s\) \[1\] have length \[0\]"),
        ([5, 1, 9, 3, 9], ValueError, "`lengths` has 5 entries for a batch of 6 sequences"),
        ([5, 1, 10, 3, 9, 7], ValueError, r"`lengths` exceed the padded length 9 for sequence\(s\) \[2\]"),
        (torch.ones(6), TypeError, "`lengths` must be integers"),
    ],
)
def test_bad_lengths(lengths, error, match):
    _, padded = padded_batch()
    with pytest.raises(error, match=match):
        RNNEncoder(4, 6)((padded, lengths))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"cell": "rnn"}, "`cell` must be one of"),
        ({"pooling": "first"}, "`pooling` must be one of"),
        ({"hidden_size": 0}, "`hidden_size` must be a positive int"),
        ({"num_layers": 0}, "`num_layers` must be a positive int"),
        ({"input_layout": "rows"}, "`input_layout` must be one of"),
        ({"dropout": 1.0}, r"`dropout` must be a float in \[0, 1\)"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RNNEncoder(**{"input_size": 4, "hidden_size": 6, **kwargs})


def test_bad_input_shapes():
    with pytest.raises(ValueError, match=r"expected a padded batch \(batch, time, 4\), got shape \(2, 3, 5\)"):
        RNNEncoder(4, 6)(torch.rand(2, 3, 5))
    with pytest.raises(ValueError, match="expects images"):
        RNNEncoder(12, 6, input_layout="image_columns")(torch.rand(2, 20, 12))
    with pytest.raises(ValueError, match="a pair \\(padded, lengths\\)"):
        RNNEncoder(4, 6)((torch.rand(2, 3, 4), [3, 3], "x"))
