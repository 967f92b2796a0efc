"""The training sampler: deterministic, resumable from consumed_samples, rank-sharded like one bigger batch."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from data_pipelines import DataConfig, LMDataModule
from data_pipelines.sampler import ResumableBatchSampler, val_indices


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_sampler_is_deterministic_and_seeded():
    a = take(ResumableBatchSampler(50, 4, seed=1), 30)
    assert a == take(ResumableBatchSampler(50, 4, seed=1), 30)
    assert a != take(ResumableBatchSampler(50, 4, seed=2), 30)
    assert all(len(b) == 4 for b in a)


def test_epochs_chain_and_each_epoch_is_a_permutation():
    n = 50
    flat = [i for b in take(ResumableBatchSampler(n, 7, seed=3), 30) for i in b]  # 210 samples: 4.2 epochs
    for e in range(4):
        assert sorted(flat[e * n : (e + 1) * n]) == list(range(n))  # batches straddle epoch ends seamlessly
    assert flat[:n] != flat[n : 2 * n]  # a fresh shuffle per epoch


@pytest.mark.parametrize("consumed", [0, 12, 48, 52, 123])
def test_resume_from_consumed_samples_equals_continuing(consumed):
    b, world = 4, 3
    full = [take(ResumableBatchSampler(50, b, r, world, seed=5), 40) for r in range(world)]
    if consumed % (b * world) == 0:  # aligned: exactly the batches the uninterrupted samplers yield next
        k = consumed // (b * world)
        for r in range(world):
            assert take(ResumableBatchSampler(50, b, r, world, seed=5, consumed_samples=consumed), 10) == full[r][k : k + 10]
    # aligned or not (52, 123): the global order after `consumed` equals the single-rank stream continued from there
    one = [i for bt in take(ResumableBatchSampler(50, 1, seed=5), consumed + 60) for i in bt]
    resumed = [ResumableBatchSampler(50, b, r, world, seed=5, consumed_samples=consumed) for r in range(world)]
    its = [iter(s) for s in resumed]
    glob = [i for _ in range(5) for it in its for i in next(it)]
    assert glob == one[consumed : consumed + 60]


def test_two_ranks_see_what_one_rank_with_double_batch_sees():
    one = take(ResumableBatchSampler(37, 8, 0, 1, seed=9), 20)
    r0 = take(ResumableBatchSampler(37, 4, 0, 2, seed=9), 20)
    r1 = take(ResumableBatchSampler(37, 4, 1, 2, seed=9), 20)
    assert [a + b for a, b in zip(r0, r1)] == one


def test_val_shards_cover_every_block_once_in_equal_counts():
    shards = [val_indices(11, r, 3) for r in range(3)]
    assert all(len(s) == 4 for s in shards)  # equal batch counts on every rank: no collective waits
    assert sorted(i for s in shards for i in s if i is not None) == list(range(11))  # none dropped, none twice
    assert [s.count(None) for s in shards] == [0, 0, 1]


def test_padding_rows_carry_no_label(tmp_path):
    np.arange(8 * 5, dtype=np.uint16).tofile(tmp_path / "train.bin")
    cfg = DataConfig(source="tokens", path=str(tmp_path), vocab_size=100, block_size=8, batch_size=2,
                     val_fraction=0)
    dm = LMDataModule(cfg)
    dm.setup()
    batch = dm.train_dataset.__getitems__([3, None])
    assert batch["labels"][0].tolist() == batch["input_ids"][0].tolist() == list(range(24, 32))
    assert (batch["labels"][1] == -100).all()


def test_step_batches_carry_the_items_of_their_whole_step():
    from data_pipelines.sampler import StepBatches

    loader = [{"labels": torch.tensor([[1, -100, 2], [-100, -100, 3]][i % 2])} for i in range(5)]
    out = list(StepBatches(loader, 2, lambda b: {"labelled": (b["labels"] != -100).sum()}))
    assert [b["step_micro_batch"] for b in out] == [0, 1, 0, 1, 0]
    assert [int(b["step_items"]["labelled"]) for b in out] == [3, 3, 3, 3, 2]  # 2 + 1 per step; the tail alone


def test_datamodule_resumes_data_order_from_state_dict(tmp_path):
    ids = np.arange(64 * 40, dtype=np.uint16) % 1000
    ids.tofile(tmp_path / "train.bin")
    cfg = DataConfig(source="tokens", path=str(tmp_path), vocab_size=1000, block_size=64, batch_size=2, seed=7)
    dm = LMDataModule(cfg)
    dm.setup()
    it = iter(dm.train_dataloader())
    seen = []
    for _ in range(12):
        seen.append(next(it)["input_ids"])
        dm.consumed_samples += 2  # what the training side does after each micro-batch (micro 2 x world 1)
    state = dm.state_dict()
    assert state == {"consumed_samples": 24}
    rest = [next(it)["input_ids"] for _ in range(5)]
    dm2 = LMDataModule(cfg)
    dm2.load_state_dict(state)
    dm2.setup()
    it2 = iter(dm2.train_dataloader())
    for want in rest:
        assert (next(it2)["input_ids"] == want).all()
    # and a fresh module without the state starts at the beginning
    dm3 = LMDataModule(cfg)
    dm3.setup()
    assert (next(iter(dm3.train_dataloader()))["input_ids"] == seen[0]).all()


def test_two_rank_datamodules_split_the_one_rank_batches(tmp_path):
    np.arange(32 * 30, dtype=np.uint16).tofile(tmp_path / "train.bin")
    base = dict(source="tokens", path=str(tmp_path), vocab_size=1024, block_size=32, val_fraction=0.0)
    one = LMDataModule(DataConfig(batch_size=4, **base))
    one.setup()
    ranks = []
    for r in range(2):
        dm = LMDataModule(DataConfig(batch_size=2, **base))
        dm.setup()
        dm.rank, dm.world_size = r, 2  # what setup takes from the Trainer / torch.distributed
        ranks.append(iter(dm.train_dataloader()))
    it = iter(one.train_dataloader())
    for _ in range(10):
        big = next(it)["input_ids"]
        a, b = next(ranks[0])["input_ids"], next(ranks[1])["input_ids"]
        assert (big[:2] == a).all() and (big[2:] == b).all()
    assert one.val_dataloader() == []  # val_fraction=0 and no val.bin: no validation
