import pytest
import torch

from train.datamodule import _Windows


@pytest.mark.parametrize("windows,world", [(1, 2), (3, 2), (4, 2), (2, 3), (5, 4)])
def test_every_rank_gets_the_same_number_of_batches_and_each_window_counts_once(windows, world):
    data = torch.arange(windows * 4).reshape(windows, 4)
    per_rank = [list(_Windows(data, rank, world)) for rank in range(world)]
    assert len({len(batches) for batches in per_rank}) == 1 and all(per_rank)
    counted = sorted(int(w[0, 0]) // 4 for batches in per_rank for w, weight in batches if weight == 1)
    assert counted == list(range(windows))
