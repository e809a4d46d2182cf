"""The resumable training sampler/loader (tasks/run/samplers.py), against independently computed orders."""

import warnings

import torch
from torch.utils.data import DistributedSampler

from tasks.run.samplers import ResumableDataLoader, ResumableSampler, resumable_train_loader

N, BS, SEED = 23, 4, 7
DATA = list(range(100, 100 + N))  # item i is 100 + i


def expected_order(epoch, seed=SEED, n=N):
    return [100 + i for i in torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()]


def batches(loader):
    return [b.tolist() for b in loader]


def flat(bs):
    return [x for b in bs for x in b]


def test_each_epoch_is_a_seeded_permutation():
    loader = resumable_train_loader(DATA, BS, SEED)
    for epoch in range(3):
        loader.sampler.set_epoch(epoch)
        got = batches(loader)
        assert flat(got) == expected_order(epoch)
        assert [len(b) for b in got] == [4, 4, 4, 4, 4, 3]
    assert len(loader) == 6


def test_ranks_split_the_epoch_like_distributed_sampler():
    seen = []
    for rank in (0, 1):
        loader = ResumableDataLoader(DATA, batch_size=BS, sampler=ResumableSampler(DATA, 2, rank, seed=SEED))
        loader.sampler.set_epoch(1)
        ref = DistributedSampler(range(N), num_replicas=2, rank=rank, shuffle=True, seed=SEED)
        ref.set_epoch(1)
        want = expected_order(1)
        want = (want + want[:1])[rank::2]  # padded to 24, dealt round-robin
        assert flat(batches(loader)) == want == [100 + i for i in ref]
        seen += want
    assert sorted(set(seen)) == DATA


def test_state_after_k_batches_resumes_the_rest_of_the_epoch_then_the_next():
    full = resumable_train_loader(DATA, BS, SEED)
    full.sampler.set_epoch(2)
    epoch2 = batches(full)
    full.sampler.set_epoch(3)
    epoch3 = batches(full)

    first = resumable_train_loader(DATA, BS, SEED)
    first.sampler.set_epoch(2)
    it = iter(first)
    head = [next(it).tolist() for _ in range(2)]
    state = first.state_dict()
    assert state["epoch"] == 2 and state["samples"] == 8
    del it  # the process dies here

    resumed = resumable_train_loader(DATA, BS, SEED)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)  # Lightning sets the restored epoch before the first batch
    rest = batches(resumed)
    assert head + rest == epoch2
    assert resumed.state_dict()["samples"] == N  # the epoch is complete
    resumed.sampler.set_epoch(3)
    assert batches(resumed) == epoch3  # the skip applied to one epoch only


def test_a_saved_position_of_another_epoch_is_not_applied():
    loader = resumable_train_loader(DATA, BS, SEED)
    loader.load_state_dict({"epoch": 0, "samples": 20, "dataset_len": N, "num_replicas": 1, "seed": SEED,
                            "shuffle": True})
    loader.sampler.set_epoch(1)  # Lightning moved on to the next epoch (the checkpoint ended epoch 0)
    assert flat(batches(loader)) == expected_order(1)


def test_other_data_warn_and_restart_the_epoch():
    state = {"epoch": 0, "samples": 8, "dataset_len": N + 1, "num_replicas": 1, "seed": SEED, "shuffle": True}
    loader = resumable_train_loader(DATA, BS, SEED)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader.load_state_dict(state)
    assert any("dataset_len: checkpoint 24, now 23" in str(w.message) for w in caught)
    assert flat(batches(loader)) == expected_order(0)


def test_iterating_does_not_touch_the_global_torch_rng():
    torch.manual_seed(3)
    before = torch.get_rng_state()
    loader = resumable_train_loader(DATA, BS, SEED)
    batches(loader)
    assert torch.equal(before, torch.get_rng_state())


def test_worker_prefetch_is_not_counted_as_seen():
    """With worker processes the sampler runs ahead of training; the position counts handed-out batches."""
    full = resumable_train_loader(DATA, BS, SEED)
    full.sampler.set_epoch(0)
    want = batches(full)
    first = resumable_train_loader(DATA, BS, SEED, num_workers=2)
    first.sampler.set_epoch(0)
    it = iter(first)
    head = [next(it).tolist() for _ in range(2)]
    state = first.state_dict()
    del it
    assert state["samples"] == 2 * BS
    resumed = resumable_train_loader(DATA, BS, SEED, num_workers=2)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(0)
    assert head + batches(resumed) == want
