"""Runtime tensors derived from the weights (row sums, int8 copies) are made lazily: not when the
execution mode is set (a checkpoint load), but on each layer's first eager call, or for all pending
layers when a torch.compile trace starts, or by `prepare_runtime`."""

import pytest
import torch
import torch._dynamo.testing

from dq.kernels import dispatch, runners, set_execution
from dq.nn import QuantLinear
from dq.quant.spec import QuantSpec

W4G = QuantSpec(bits=4, granularity="group", group_size=32)
A8 = QuantSpec(bits=8, granularity="tensor", symmetric=False)  # asymmetric: needs the row sums


@pytest.fixture(autouse=True)
def cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DQ_CACHE_DIR", str(tmp_path))
    return tmp_path


def w4a8(seed=0, width=128, out=96):
    torch.manual_seed(seed)
    return QuantLinear.from_float(torch.nn.Linear(width, out), W4G, A8, [(-3.0, 3.0)])


def is_pending(q):
    return bool(q.__dict__.get("_dq_pending")) and "wsum" not in q._buffers and "_dq_int8_weight" not in q.__dict__


def expected(q, x):
    """The int8 path's output with every runtime tensor made up front."""
    twin = w4a8()
    twin.load_state_dict(q.state_dict())
    set_execution(twin, "real", path="int8_copy")
    dispatch.prepare_runtime(twin)
    assert not is_pending(twin)
    return twin(x)


def test_setting_the_mode_reads_no_weight_and_the_first_call_prepares():
    q = w4a8()
    set_execution(q, "real", path="int8_copy")
    assert is_pending(q)  # nothing derived from the weights yet (what a load pays)
    assert dispatch.runtime_nbytes(q) == 0
    x = torch.randn(5, 128)
    with torch.no_grad():
        y = q(x)
    assert not q.__dict__.get("_dq_pending")
    assert q.wsum.shape == (96,) and dispatch.runtime_nbytes(q) == 128 * 96
    assert torch.equal(q.wsum, runners.integer_weight(q).sum(dim=1, dtype=torch.int32).float())
    torch.testing.assert_close(y, expected(q, x), rtol=0, atol=0)
    assert "wsum" not in q.state_dict()  # runtime state, never saved


def test_prepare_runtime_makes_everything_now():
    q = w4a8()
    set_execution(q, "real", path="int8_copy")
    dispatch.prepare_runtime(q)
    assert not is_pending(q) and "wsum" in q._buffers and "_dq_int8_weight" in q.__dict__


def test_compile_before_any_eager_call_prepares_at_the_compile_start():
    """fullgraph=True on a layer never called eagerly: the compile start hook makes the state
    before the trace (stored on the layer, not recomputed in the graph), no recompile after."""
    torch._dynamo.reset()
    q = w4a8()
    set_execution(q, "real", path="int8_copy")  # after the reset: the hook is (re)installed here
    assert is_pending(q)
    counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
    compiled = torch.compile(q, fullgraph=True, backend=counter)
    x = torch.randn(5, 128)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        first = compiled(x)
        assert not is_pending(q) and "wsum" in q._buffers
        again = compiled(x + 1)
    assert counter.frame_count == 1
    torch.testing.assert_close(first, expected(q, x), rtol=0, atol=1e-6)
    torch.testing.assert_close(again, expected(q, x + 1), rtol=0, atol=1e-6)


def test_without_the_compile_hook_the_graph_computes_the_same_function():
    """A Dynamo reset between setting the mode and compiling clears the hook: the pending layer's
    row sums and int8 weight are computed inside the graph (same outputs), nothing is stored."""
    q = w4a8()
    set_execution(q, "real", path="int8_copy")
    torch._dynamo.reset()
    compiled = torch.compile(q, fullgraph=True, backend="eager")
    x = torch.randn(5, 128)
    with torch.no_grad():
        got = compiled(x)
    assert is_pending(q)
    torch.testing.assert_close(got, expected(q, x), rtol=0, atol=1e-6)


def test_moving_a_prepared_layer_keeps_it_correct():
    q = w4a8()
    set_execution(q, "real", path="int8_copy")
    x = torch.randn(5, 128)
    with torch.no_grad():
        before = q(x)
        q.to("cpu")  # releases the runtime copies and path choices (per device); remade on the next call
        after = q(x)
    assert "wsum" in q._buffers  # a buffer: it moves with the layer
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)  # the path may be chosen anew


def test_weight_only_int8_path_is_prepared_at_the_compile_start():
    torch.manual_seed(0)
    q = QuantLinear.from_float(torch.nn.Linear(128, 96), W4G, None)
    twin = QuantLinear.from_float(torch.nn.Linear(128, 96), W4G, None)
    twin.load_state_dict(q.state_dict())
    for m in (q, twin):
        set_execution(m, "real", path="int_mm_a8", weight_only_int8=True)
    assert q.__dict__.get("_dq_pending") and "_dq_int8_wsum" not in q.__dict__
    x = torch.randn(6, 128)
    with torch.no_grad():
        want = twin(x)  # eager: prepared on the call
        got = torch.compile(q, fullgraph=True, backend="eager")(x)
    assert "_dq_int8_wsum" in q.__dict__ and "_dq_int8_weight" in q.__dict__
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
