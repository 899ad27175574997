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


def test_store_is_held_per_layer():
    """A lookup reads one layer's entries; the flat `entries` view and its setter still work."""
    store = StatsStore()
    for layer in ("a", "b"):
        for t in (1.0, 2.0):
            store.add((layer, t, "all"), ActivationStats.from_rows(torch.randn(4, 3), 64))
    assert store.by_layer.keys() == {"a", "b"} and store.by_layer["a"].keys() == {(1.0, "all"), (2.0, "all")}
    store.by_layer["b"] = {}  # a layer emptied ...
    assert store.layers() == ["a"] and store.select("b") is None  # ... is no layer, and select never scans it
    store.entries = {k: v for k, v in store.entries.items() if k[1] == 2.0}
    assert store.timesteps() == [2.0] and store.select("a").count == 4


def test_all_reduce_without_processes_is_a_no_op():
    store = StatsStore()
    store.add(("a", 1.0, "all"), ActivationStats.from_rows(torch.ones(2, 3), 64))
    assert store.all_reduce_() is store and store.select("a").count == 2


def test_calibrating_a_denoiser_under_accelerate_cpu_offload():
    """The hooks see the same inputs when accelerate's offload hooks (weights kept off the model,
    loaded per forward) run the denoiser: the statistics equal those of the plain model."""
    import pytest

    accelerate = pytest.importorskip("accelerate")
    from dq.calibrate.hooks import Calibrator, CalibTarget
    from dq.calibrate.run import run_pipeline
    from dq.testing.tiny import default_call_kwargs, prompts_for, tiny_pipeline

    kwargs = {k: v for k, v in default_call_kwargs("pixart").items() if k not in ("num_inference_steps", "output_type")}
    stores = []
    for offload in (False, True):
        pipe = tiny_pipeline("pixart", seed=0)
        model = pipe.transformer
        if offload:
            accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
            assert next(model.parameters()).device.type == "meta"  # the weights really are off the model
        targets = [CalibTarget(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        with Calibrator(pipe, model, targets, 256) as calibrator:
            run_pipeline(pipe, prompts_for("pixart", 2), num_inference_steps=2, batch_size=2, seed=0, call_kwargs=kwargs)
        stores.append(calibrator.store)
    plain, offloaded = stores
    assert plain.entries.keys() == offloaded.entries.keys() and len(plain.layers()) > 10
    for key, stats in plain.entries.items():
        other = offloaded.entries[key]
        assert other.count == stats.count and torch.equal(other.hist, stats.hist), key
        torch.testing.assert_close(other.sumsq, stats.sumsq)


def test_second_moments_go_to_host_memory_when_they_would_crowd_the_device(monkeypatch):
    import pytest

    from dq.calibrate.hooks import CalibTarget, moment_bytes, moments_on_cpu
    from dq.errors import CalibrationError

    wide = CalibTarget("wide", torch.nn.Linear(1024, 8), second_moment=True)
    plain = CalibTarget("plain", torch.nn.Linear(4096, 8))  # no second moment: costs nothing
    assert moment_bytes(wide) == 4 * 1024 * 1024 and moment_bytes(plain) == 0
    cuda = torch.device("cuda")  # only compared by type: no GPU needed
    assert moments_on_cpu([wide, plain], cuda, free_bytes=4 * 2**20 * 4 - 1)  # over a quarter of the free memory
    assert not moments_on_cpu([wide, plain], cuda, free_bytes=4 * 2**20 * 4)
    assert not moments_on_cpu([wide], torch.device("cpu"), free_bytes=0)  # already in host memory
    monkeypatch.setenv("DQ_MOMENTS_ON", "cpu")
    assert moments_on_cpu([wide], cuda, free_bytes=2**40)
    monkeypatch.setenv("DQ_MOMENTS_ON", "gpu")
    with pytest.raises(CalibrationError, match="DQ_MOMENTS_ON"):
        moments_on_cpu([wide], cuda, free_bytes=2**40)


def test_prompt_shares_cover_the_list_in_order():
    import pytest

    from dq.calibrate.distributed import share
    from dq.errors import DQError

    for count, world in ((5, 2), (8, 2), (7, 3), (3, 3), (1, 1)):
        parts = [share(count, world, r) for r in range(world)]
        assert [i for p in parts for i in p] == list(range(count))  # contiguous, in rank order
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(DQError, match="at least one prompt per process"):
        share(1, 2, 0)


def test_process_group_timeout_from_the_environment(monkeypatch):
    import pytest

    from dq.calibrate.distributed import DEFAULT_TIMEOUT_S, timeout_seconds
    from dq.errors import DQError

    monkeypatch.delenv("DQ_DIST_TIMEOUT", raising=False)
    assert timeout_seconds() == DEFAULT_TIMEOUT_S == 600  # not gloo's 30 minutes
    monkeypatch.setenv("DQ_DIST_TIMEOUT", "45")
    assert timeout_seconds() == 45
    for bad in ("soon", "0", "-3"):
        monkeypatch.setenv("DQ_DIST_TIMEOUT", bad)
        with pytest.raises(DQError, match="DQ_DIST_TIMEOUT"):
            timeout_seconds()
