import torch

from dq.calibrate.stats import ActivationStats, StatsStore
from dq.calibrate.timesteps import TimestepGroups


def test_merge_equals_stats_of_concatenation():
    torch.manual_seed(0)
    a, b = torch.randn(50, 6), torch.randn(70, 6) * 7
    merged = ActivationStats.from_rows(a, 256).merge_(ActivationStats.from_rows(b, 256))
    whole = ActivationStats.from_rows(torch.cat([a, b]), 256)
    assert merged.count == whole.count == 120
    for field in ("absmax", "min", "max", "sumsq"):
        assert torch.allclose(getattr(merged, field), getattr(whole, field), rtol=1e-5)
    assert merged.hist_exp == whole.hist_exp
    assert torch.equal(merged.hist, whole.hist)  # power-of-two ranges merge exactly


def test_store_state_dict_round_trip_and_merge_across_processes():
    s1, s2 = StatsStore(), StatsStore()
    s1.add(("blk.to_q", 999.0, "cond"), ActivationStats.from_rows(torch.randn(8, 4), 64))
    s2.add(("blk.to_q", 999.0, "cond"), ActivationStats.from_rows(torch.randn(8, 4), 64))
    s2.add(("blk.to_q", 1.0, "uncond"), ActivationStats.from_rows(torch.randn(8, 4), 64))
    s1b = StatsStore.from_state_dict(s1.state_dict())
    s1b.merge_(s2)
    assert s1b.entries[("blk.to_q", 999.0, "cond")].count == 16
    assert s1b.timesteps() == [1.0, 999.0] and s1b.branches() == ["cond", "uncond"]
    assert s1b.select("blk.to_q").count == 24
    assert s1b.select("blk.to_q", [999.0], "cond").count == 16


def test_timestep_groups_by_value_not_count():
    g = TimestepGroups.from_timesteps([999, 749, 499, 249], 2)
    assert g.members == [[249.0, 499.0], [749.0, 999.0]]
    # any other sampler's timesteps fall in the group whose interval holds them
    assert [g.index(t) for t in (980, 700, 630, 10)] == [1, 1, 1, 0]
    flow = TimestepGroups.from_timesteps([1.0, 0.75, 0.5, 0.25], 4)  # flow-matching scale
    assert [flow.index(t) for t in (0.99, 0.7, 0.6, 0.3, 0.0)] == [3, 2, 1, 0, 0]
    assert len(TimestepGroups.from_timesteps([5.0], 4)) == 1
