"""Random streams under resumes, DataLoader workers and several processes: each training
image's augmentation is a function of (seed, epoch, sample), so the number of workers and the point a
resumed run restarts from change nothing; each process gets its own stream for dropout and batch ops."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from visionpoc.config import load_config
from visionpoc.data.loaders import stream_loader, train_transform
from visionpoc.data.sources import read_stanford_dogs
from visionpoc.data.splits import make_splits
from visionpoc.distributed import SINGLE, Dist
from visionpoc.train import seed_rank

DATA_CFG = {
    "input_size": (3, 32, 32),
    "interpolation": "bilinear",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "crop_pct": 0.9,
    "crop_mode": "center",
}


def _epoch(
    mini_dogs: Path, workers: int, epoch: int, skip: int = 0, d: Dist = SINGLE, bs: int = 4
) -> list[torch.Tensor]:
    from visionpoc.data.loaders import set_epoch

    cfg = load_config(None, [f"data.num_workers={workers}", "train.augment=basic", "train.seed=3"])
    train = make_splits(read_stanford_dogs(mini_dogs), 0.0, None, 0).train
    loader = stream_loader(
        train, train_transform(DATA_CFG, "basic"), bs, True, cfg, torch.device("cpu"), d, every_epoch=True
    )
    out = []
    for e in range(1, epoch + 1):  # persistent workers live through the earlier epochs, as in a run
        set_epoch(loader, e, skip_batches=skip if e == epoch else 0)
        out = [x for x, _ in loader]
    return out


def test_augmentation_is_the_same_for_any_worker_count_and_resume_point(mini_dogs: Path) -> None:
    state = torch.get_rng_state()
    main_process = _epoch(mini_dogs, 0, epoch=2)
    assert torch.equal(torch.get_rng_state(), state)  # the training stream (dropout, mixup) saw no draw
    with_workers = _epoch(mini_dogs, 2, epoch=2)  # the workers of epoch 1 are reused for epoch 2
    resumed = _epoch(mini_dogs, 1, epoch=2, skip=1)  # a run resumed mid-epoch 2, after its first batch
    assert len(main_process) == len(with_workers) == len(resumed) + 1 >= 3
    for a, b in zip(main_process, with_workers, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(main_process[1:], resumed, strict=True):
        assert torch.equal(a, b)


def test_each_epoch_augments_differently(mini_dogs: Path) -> None:
    one, two = _epoch(mini_dogs, 0, epoch=1), _epoch(mini_dogs, 0, epoch=2)
    assert not torch.equal(torch.cat(one).sum(0), torch.cat(two).sum(0))  # same images, other crops


def test_ranks_draw_their_own_streams_after_an_identical_model_init() -> None:
    draws = []
    for rank in (0, 1):
        torch.manual_seed(7)  # seed_everything(train.seed): identical on every rank
        init = torch.nn.Linear(4, 4).weight.detach().clone()
        seed_rank(7, Dist(rank, 2))
        draws.append((init, torch.rand(8), random.random(), np.random.rand()))
    (w0, t0, p0, n0), (w1, t1, p1, n1) = draws
    assert torch.equal(w0, w1)  # model init stays identical
    assert not torch.equal(t0, t1) and p0 != p1 and n0 != n1
    seed_rank(7, Dist(0, 1))
    assert torch.equal(torch.rand(8), t0)  # a single process draws rank 0's stream


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_shards_the_same_per_sample_augmentation(mini_dogs: Path, rank: int) -> None:
    """Sample i is augmented alike whichever process draws it: 2 processes x b see the crops 1 x 2b sees."""
    from visionpoc.distributed import EpochSampler

    single = torch.cat(_epoch(mini_dogs, 0, epoch=1, bs=1))  # (N, 3, 32, 32) in epoch 1's order
    shard = torch.cat(_epoch(mini_dogs, 0, epoch=1, d=Dist(rank, 2), bs=1))  # this rank's half
    whole, mine = EpochSampler(len(single), 3), EpochSampler(len(single), 3, Dist(rank, 2))
    whole.epoch = mine.epoch = 1
    position = {i: k for k, i in enumerate(whole.indices())}
    assert len(shard) == len(mine.indices()) == len(single) // 2
    for k, i in enumerate(mine.indices()):
        assert torch.equal(shard[k], single[position[i]])
