import torch

from lowbit.primitives import from_blocks, to_blocks


def test_blocks_round_trip_for_every_shape():
    x = torch.arange(6 * 8, dtype=torch.float32).reshape(6, 8)
    for block in [(1, 8), (1, 4), (6, 8), (2, 4), (3, 2)]:
        xb = to_blocks(x, block)
        assert xb.shape == (6 // block[0], 8 // block[1], block[0] * block[1])
        assert torch.equal(from_blocks(xb, block), x)


def test_group_blocks_are_contiguous_runs_of_a_row():
    x = torch.arange(16, dtype=torch.float32).reshape(2, 8)
    assert to_blocks(x, (1, 4))[1, 0].tolist() == [8.0, 9.0, 10.0, 11.0]
