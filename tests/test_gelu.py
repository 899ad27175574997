"""The feed-forward's tanh GELU in the form measured faster (dq.nn.gelu): the same function as
torch's kernel, installed in real execution only, chosen per shape class, checked, cached, and
torch's own kernel inside torch.compile, under autograd and for other dtypes."""

import copy
import io
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import favour_races
from diffusers.models.attention import FeedForward

from dq.errors import DQError
from dq.kernels import choice, set_execution
from dq.nn import gelu as G


@pytest.fixture(autouse=True)
def cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(choice, "_CACHE", None)
    monkeypatch.setattr(G, "MIN_ELEMENTS", 0)  # these tests' models are small; the threshold has its own test
    return tmp_path


class MLPs(torch.nn.Module):
    """Two DiT feed-forwards (tanh GELU) and one with the erf GELU, which is left alone."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.ff1 = FeedForward(32, activation_fn="gelu-approximate").eval()
        self.ff2 = FeedForward(32, activation_fn="gelu-approximate").eval()
        self.erf = FeedForward(32, activation_fn="gelu").eval()

    def forward(self, x):
        return self.erf(self.ff2(self.ff1(x)))


def test_the_sigmoid_form_is_torchs_tanh_gelu_and_leaves_its_input():
    x = torch.cat([torch.randn(4096) * 3, torch.tensor([0.0, -0.0, 1e-30, -1e-30, 30.0, -30.0, 1e4, -1e4, 1e20, -1e20,
                                                        math.inf, -math.inf])])
    before = x.clone()
    got, ref = G.gelu_sigmoid(x), F.gelu(x, approximate="tanh")
    assert torch.equal(x, before)
    assert torch.allclose(got, ref, rtol=1e-6, atol=1e-6, equal_nan=True), (got - ref).abs().nan_to_num().max()
    assert torch.isnan(G.gelu_sigmoid(torch.tensor([math.nan]))).all()


def test_installed_on_tanh_gelus_in_real_execution_only():
    model = MLPs()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    set_execution(model, "real")
    assert isinstance(model.ff1.net[0].__dict__.get("gelu"), G.MeasuredGELU)
    assert isinstance(model.ff2.net[0].__dict__.get("gelu"), G.MeasuredGELU)
    assert "gelu" not in model.erf.net[0].__dict__  # the erf GELU: torch's kernel, untouched
    first = model.ff1.net[0].gelu
    set_execution(model, "auto")  # again: the same object, not replaced
    assert model.ff1.net[0].gelu is first
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    set_execution(model, "sim")  # research mode: the modules' own method again
    assert "gelu" not in model.ff1.net[0].__dict__ and "gelu" not in model.ff2.net[0].__dict__
    set_execution(model, "real")
    set_execution(model, "real", gelu=False)
    assert "gelu" not in model.ff1.net[0].__dict__
    with pytest.raises(DQError, match="gelu must be True or False"):
        set_execution(model, "real", gelu="yes")


@pytest.mark.parametrize("fast", ["gelu_sigmoid", "gelu"])
def test_the_faster_correct_form_is_kept_per_shape_class_and_cached(monkeypatch, fast):
    model = MLPs()
    x = torch.randn(2, 40, 32)
    with torch.no_grad():
        ref = model(x)
        set_execution(model, "real")
        seen = favour_races(monkeypatch, fast)
        out = model(x)
    assert seen == [{"gelu", "gelu_sigmoid"}]  # one shape class: both feed-forwards share it
    assert set(model.ff1.net[0].gelu.paths.values()) == {fast}
    if fast == "gelu":
        assert torch.equal(out, ref)
    else:
        assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
    data = json.loads(choice.cache().path.read_text())
    assert [k for k in data["entries"] if k.startswith("gelu|")] == list(model.ff1.net[0].gelu.paths)
    # the next process reads it: a new model of the same shapes measures nothing
    monkeypatch.setattr(choice, "_CACHE", None)
    other = MLPs()
    set_execution(other, "real")
    with torch.no_grad():
        assert torch.equal(other(x), out)
        assert len(seen) == 1
        other(torch.randn(2, 400, 32))  # another shape class: measured
    assert len(seen) == 2


def test_a_wrong_or_raising_form_is_dropped(monkeypatch):
    for bad in (lambda x: x * 1.01, lambda x: (_ for _ in ()).throw(RuntimeError("no kernel"))):
        monkeypatch.setitem(G.RUN, "gelu_sigmoid", bad)
        monkeypatch.setattr(G, "gelu_sigmoid", bad)
        monkeypatch.setattr(choice, "_CACHE", None)
        found = G.measure(torch.randn(64, 32))
        assert found.choice == "gelu" and "gelu_sigmoid" in found.dropped, found
        assert "gelu_sigmoid" not in found.times


def test_torchs_kernel_under_compile_autograd_and_other_dtypes(monkeypatch):
    seen = favour_races(monkeypatch, "gelu_sigmoid")
    g = G.MeasuredGELU()
    assert g.path_for(torch.randn(8, 8, dtype=torch.bfloat16)) == "gelu"
    x = torch.randn(8, 8, requires_grad=True)
    assert g.path_for(x) == "gelu"
    y = g(x)
    y.sum().backward()  # autograd through torch's kernel
    assert x.grad is not None
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert g.path_for(torch.randn(8, 8)) == "gelu"  # nothing measured inside a graph
    assert seen == [] and g.paths == {}


def test_small_inputs_run_torchs_kernel_without_measuring(monkeypatch):
    seen = favour_races(monkeypatch, "gelu_sigmoid")
    monkeypatch.setattr(G, "MIN_ELEMENTS", 1 << 18)
    g = G.MeasuredGELU()
    x = torch.randn(2, 255, 512)  # one row short of the threshold
    assert g.path_for(x) == "gelu" and seen == []
    assert torch.equal(g(x), F.gelu(x, approximate="tanh"))
    assert g.path_for(torch.randn(2, 256, 512)) == "gelu_sigmoid" and len(seen) == 1


def test_compiled_deepcopied_and_pickled_models_keep_working(monkeypatch):
    favour_races(monkeypatch, "gelu_sigmoid")
    model = MLPs()
    set_execution(model, "real")
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        out = model(x)
        assert torch.equal(copy.deepcopy(model)(x), out)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        assert torch.equal(torch.load(buf, weights_only=False)(x), out)
        compiled = torch.compile(model, backend="eager", fullgraph=True)  # no graph break
        assert torch.allclose(compiled(x), out, rtol=1e-5, atol=1e-6)


def test_a_cache_entry_of_gelu_paths_reads_back_and_ties_go_to_torch():
    m = choice.Measurement.from_dict({"choice": "gelu_sigmoid", "times": {"gelu": 2e-3, "gelu_sigmoid": 1e-3},
                                      "dropped": {}})
    assert m.choice == "gelu_sigmoid"
    assert choice.decide({"gelu": 1.00e-3, "gelu_sigmoid": 0.99e-3}) == "gelu"
    assert choice.decide({"gelu": 1e-3, "gelu_sigmoid": 0.5e-3}) == "gelu_sigmoid"
    assert choice.decide({}, {"gelu": "raised", "gelu_sigmoid": "raised"}) == "gelu"
