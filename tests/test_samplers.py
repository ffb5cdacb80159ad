import torch

from tinyseg.data.samplers import TrainBatchSampler, repeat_factors


class IndexOfKey(torch.utils.data.Dataset):
    def __getitem__(self, key):
        return key[0]


def indices(batches):
    return [[i for i, _ in batch] for batch in batches]


def test_ranks_split_the_single_process_batches():
    ratios = [1.0] * 20
    single = indices(TrainBatchSampler(ratios, 4, seed=5, group_by_aspect=False))
    ranks = [indices(TrainBatchSampler(ratios, 2, seed=5, rank=r, world_size=2, group_by_aspect=False)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(single) == 5
    for k, batch in enumerate(single):
        assert sorted(ranks[0][k] + ranks[1][k]) == sorted(batch)


def test_grouping_keeps_orientation_and_equal_lengths():
    ratios = [1.5, 0.7] * 11 + [1.5]
    for world in (1, 2, 3):
        samplers = [TrainBatchSampler(ratios, 2, seed=0, rank=r, world_size=world) for r in range(world)]
        lengths = {len(list(iter(s))) for s in samplers}
        assert len(lengths) == 1 and lengths == {len(samplers[0])}
    batches = indices(TrainBatchSampler(ratios, 2, seed=0))
    mixed = [b for b in batches if len({ratios[i] >= 1 for i in b}) > 1]
    assert len(mixed) <= 1  # only the leftovers may mix


def test_new_order_each_epoch_and_epoch_tag():
    sampler = TrainBatchSampler([1.0] * 16, 2, seed=0, group_by_aspect=False)
    first = list(iter(sampler))
    sampler.set_epoch(1)
    second = list(iter(sampler))
    assert indices(first) != indices(second)
    assert {e for b in second for _, e in b} == {1}
    sampler.skip_batches = 3
    assert indices(list(iter(sampler))) == indices(second)[3:]
    # a DataLoader with workers iterates its batch sampler twice when it starts: both must skip
    loader = torch.utils.data.DataLoader(IndexOfKey(), batch_sampler=sampler, num_workers=1, collate_fn=list)
    assert list(loader) == indices(second)[3:]


def test_repeat_factors_favour_rare_classes():
    labels = [[1]] * 90 + [[2]] * 10 + [[1, 2]]
    factors = repeat_factors(labels, threshold=0.5)
    assert factors[0] == 1.0 and factors[95] > 2.0 and factors[-1] == factors[95]
    sampler = TrainBatchSampler([1.0] * len(labels), 1, seed=0, group_by_aspect=False, factors=factors)
    drawn = [i for b in indices(iter(sampler)) for i in b]
    rare = sum(1 for i in drawn if labels[i] != [1])
    assert rare > 2 * 11  # rare images come about sqrt(0.5 / 0.11) ~ 2.1 times each
