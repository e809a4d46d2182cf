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


# --- length grouping -----------------------------------------------------------------------------
LENGTHS = [(7 * i) % 11 + 1 for i in range(N)]  # sample i has length LENGTHS[i]


def grouped_reference(epoch, group_size, seed=SEED, bs=BS):
    """From the docstring: mega-batches of group_size * bs of the epoch's permutation, each sorted by
    length (longest first, ties in permutation order), cut into batches; full batches shuffled under
    randperm(seed + epoch + 7919), the short one last."""
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    mega, cut = group_size * bs, []
    for s in range(0, N, mega):
        chunk = perm[s:s + mega]
        chunk = [i for _, _, i in sorted((-LENGTHS[i], pos, i) for pos, i in enumerate(chunk))]
        cut += [chunk[j:j + bs] for j in range(0, len(chunk), bs)]
    full, short = [b for b in cut if len(b) == bs], [b for b in cut if len(b) < bs]
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed + epoch + 7919)).tolist()
    return [[100 + i for i in full[k]] for k in order] + [[100 + i for i in b] for b in short]


def test_length_grouped_batches_follow_the_reference_and_cover_the_epoch():
    loader = resumable_train_loader(DATA, BS, SEED, lengths=LENGTHS)
    loader.sampler.group_size = 2
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        got = batches(loader)
        assert got == grouped_reference(epoch, 2)
        assert sorted(flat(got)) == DATA and [len(b) for b in got] == [4, 4, 4, 4, 4, 3]
        # inside a batch the lengths never increase (each batch is a slice of a sorted mega-batch)
        for b in got:
            lens = [LENGTHS[x - 100] for x in b]
            assert lens == sorted(lens, reverse=True)


def test_length_grouping_reduces_padding():
    lengths = [int(x) for x in torch.randint(1, 60, (640,), generator=torch.Generator().manual_seed(0))]
    data = list(range(640))
    plain = resumable_train_loader(data, 32, 0)
    grouped = resumable_train_loader(data, 32, 0, lengths=lengths)
    padded = [sum(max(lengths[i] for i in b.tolist()) * len(b) for b in ld) for ld in (plain, grouped)]
    assert padded[1] < 0.6 * padded[0], padded


def test_length_grouped_loader_resumes_mid_epoch():
    full = resumable_train_loader(DATA, BS, SEED, lengths=LENGTHS)
    full.sampler.set_epoch(1)
    want = batches(full)
    first = resumable_train_loader(DATA, BS, SEED, lengths=LENGTHS)
    first.sampler.set_epoch(1)
    it = iter(first)
    head = [next(it).tolist() for _ in range(3)]
    state = first.state_dict()
    second = resumable_train_loader(DATA, BS, SEED, lengths=LENGTHS)
    second.load_state_dict(state)
    second.sampler.set_epoch(1)
    assert head + batches(second) == want


def test_length_grouping_rejects_a_length_per_sample_mismatch():
    import pytest

    with pytest.raises(ValueError, match="3 values for a dataset of 23"):
        resumable_train_loader(DATA, BS, SEED, lengths=[1, 2, 3])
