"""The attention core on bfloat16 Q, K, V where measured faster (dq.nn.bf16_attention): opt-in per
recipe (on in the calibrated presets), chosen per shape class by measurement, checked against
float32 attention, cached, and left alone inside torch.compile."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import favour_races
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from dq.errors import DQError
from dq.kernels import choice, set_execution
from dq.nn import bf16_attention as B
from dq.nn.attention import QuantAttnProcessor, quantize_attention
from dq.recipe import AttentionConfig, Recipe, preset


@pytest.fixture(autouse=True)
def cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DQ_CACHE_DIR", str(tmp_path))
    return tmp_path


def rel(a, b):
    return float((a - b).norm() / b.norm())


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.attn1 = Attention(query_dim=64, heads=4, dim_head=16).eval()
        self.attn2 = Attention(query_dim=64, heads=4, dim_head=16, cross_attention_dim=32).eval()

    def forward(self, x, context, mask=None):
        x = self.attn1(x)
        return self.attn2(x, encoder_hidden_states=context, attention_mask=mask)


def inputs(n=48):
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, n, 64, generator=g), torch.randn(2, 24, 32, generator=g)


def test_opt_in_installed_in_real_execution_only_and_on_in_the_calibrated_presets():
    block = Block()
    set_execution(block, "real")  # no recipe, no flag: untouched
    assert type(block.attn1.processor) is AttnProcessor2_0
    set_execution(block, "real", attention_bf16=True)
    assert isinstance(block.attn1.processor, B.BF16AttnProcessor)
    assert isinstance(block.attn1.processor.original, AttnProcessor2_0)
    set_execution(block, "auto", attention_bf16=True)  # again: not wrapped twice
    assert type(block.attn1.processor.original) is AttnProcessor2_0
    set_execution(block, "sim", attention_bf16=True)  # research mode: the plain processors back
    assert type(block.attn1.processor) is AttnProcessor2_0 and type(block.attn2.processor) is AttnProcessor2_0
    block._dq_recipe = preset("w8a8")  # from the model's recipe when not given
    set_execution(block, "real")
    assert isinstance(block.attn2.processor, B.BF16AttnProcessor)
    set_execution(block, "real", attention_bf16=False)
    assert type(block.attn2.processor) is AttnProcessor2_0
    for name in ("w8a8", "w8a8-dynamic", "w4a8", "w4a4", "w4a16"):
        assert preset(name).attention_bf16_where_faster, name
    for name in ("w8a16", "w8a8-rtn", "w4a8-rtn", "w4a4-rtn", "fp8"):
        assert not preset(name).attention_bf16_where_faster, name
    assert Recipe.from_dict({"base": "w8a8", "attention_bf16_where_faster": False}).attention_bf16_where_faster is False
    # the legacy processor computes its float32 core otherwise than SDPA: left alone
    legacy = Block()
    legacy.attn1.set_processor(AttnProcessor())
    set_execution(legacy, "real", attention_bf16=True)
    assert type(legacy.attn1.processor) is AttnProcessor and isinstance(legacy.attn2.processor, B.BF16AttnProcessor)


def test_bad_flags_are_clear_errors():
    with pytest.raises(DQError, match="attention_bf16_where_faster"):
        Recipe.from_dict({"base": "w8a8", "attention_bf16_where_faster": "yes"})
    with pytest.raises(DQError, match="attention_bf16 must be True, False or None"):
        set_execution(Block(), "real", attention_bf16="yes")


@pytest.mark.parametrize("fast", ["sdpa_bf16", "sdpa"])
def test_the_faster_correct_path_is_kept_per_shape_class_and_cached(monkeypatch, cache_folder, fast):
    block = Block()
    x, context = inputs()
    with torch.no_grad():
        ref = block(x, context)
        set_execution(block, "real", attention_bf16=True)
        seen = favour_races(monkeypatch, fast)
        out = block(x, context)
    assert len(seen) == 2 and all(s == {"sdpa", "sdpa_bf16"} for s in seen)  # self and cross attention
    paths = {**block.attn1.processor.paths, **block.attn2.processor.paths}
    assert set(paths.values()) == {fast} and len(paths) == 2
    if fast == "sdpa":
        assert torch.equal(out, ref)  # exactly the float32 processor
    else:
        assert 1e-5 < rel(out, ref) < 2e-2  # bfloat16 roundings, and only those
    # on disk, for the next process: a new model of the same shapes measures nothing
    data = json.loads(choice.cache().path.read_text())
    assert {k for k in data["entries"] if k.startswith("attention|")} == set(paths)
    monkeypatch.setattr(choice, "_CACHE", None)
    other = Block()
    set_execution(other, "real", attention_bf16=True)
    with torch.no_grad():
        assert torch.equal(other(x, context), out)
    assert len(seen) == 2
    # another shape class (more query tokens) is measured again
    with torch.no_grad():
        other(*inputs(300))
    assert len(seen) == 4


def test_bf16_core_computes_sdpa_on_rounded_inputs_with_masks():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 40, 16, generator=g) for _ in range(3))
    keep = torch.rand(2, 1, 1, 40, generator=g) > 0.3
    for mask in (None, keep, torch.zeros(keep.shape).masked_fill(~keep, -1e4)):
        out = B.RUN["sdpa_bf16"](q, k, v, mask)
        assert out.dtype == torch.float32
        bf = [t.bfloat16() for t in (q, k, v)]
        m = mask if mask is None or mask.dtype == torch.bool else mask.bfloat16()
        assert torch.equal(out, F.scaled_dot_product_attention(*bf, attn_mask=m).float())
        assert rel(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask)) < 2e-2


def test_a_wrong_or_raising_bf16_core_is_dropped(monkeypatch):
    favour_races(monkeypatch, "sdpa_bf16")
    for broken in (lambda q, k, v, m: torch.zeros_like(q), lambda q, k, v, m: 1 / 0):
        monkeypatch.setattr(choice, "_CACHE", None)
        monkeypatch.setitem(B.RUN, "sdpa_bf16", broken)
        block = Block()
        set_execution(block, "real", attention_bf16=True)
        x, context = inputs()
        with torch.no_grad():
            block(x, context)
        entry = choice.cache().get(next(iter(block.attn1.processor.paths)))
        assert entry.choice == "sdpa" and "sdpa_bf16" in entry.dropped
        assert ("wrong result" in entry.dropped["sdpa_bf16"]) or ("raised" in entry.dropped["sdpa_bf16"])
        choice.cache().clear()


def test_under_torch_compile_the_cached_choice_is_used(monkeypatch):
    block = Block()
    set_execution(block, "real", attention_bf16=True)
    favour_races(monkeypatch, "sdpa_bf16")
    x, context = inputs()
    with torch.no_grad():
        eager = block(x, context)
        compiled = torch.compile(block, fullgraph=True)(x, context)
    assert rel(compiled, eager) < 1e-3
    # a model compiled before any eager call measures nothing and runs float32 attention
    choice.cache().clear()
    torch._dynamo.reset()
    fresh = Block()
    set_execution(fresh, "real", attention_bf16=True)
    with torch.no_grad():
        out = torch.compile(fresh, fullgraph=True)(x, context)
        set_execution(fresh, "real", attention_bf16=False)
        ref = fresh(x, context)
    assert rel(out, ref) < 1e-5
    assert not [k for k in choice.cache().entries if k.startswith("attention|")]


def test_a_bfloat16_model_runs_its_own_dtype_and_the_recipes_attention_option_wins(monkeypatch):
    favour_races(monkeypatch, "sdpa_bf16")
    block = Block().to(torch.bfloat16)
    set_execution(block, "real", attention_bf16=True)
    x, context = inputs()
    with torch.no_grad():
        block(x.bfloat16(), context.bfloat16())
    assert set(block.attn1.processor.paths.values()) <= {"sdpa"} and not choice.cache().entries
    # quantized attention replaces what the bfloat16 core replaced, and is not wrapped again
    block = Block()
    set_execution(block, "real", attention_bf16=True)
    quantize_attention(block, AttentionConfig(int8=True))
    assert isinstance(block.attn1.processor, QuantAttnProcessor)
    assert type(block.attn1.processor.original) is AttnProcessor2_0
    set_execution(block, "real", attention_bf16=True)
    assert isinstance(block.attn1.processor, QuantAttnProcessor)


def test_a_cache_entry_of_attention_paths_reads_back_and_ties_go_to_float32():
    m = choice.Measurement.from_dict({"choice": "sdpa_bf16", "times": {"sdpa": 2.0, "sdpa_bf16": 1.0}, "dropped": {}})
    assert m.choice == "sdpa_bf16"
    assert choice.decide({"sdpa": 1.02, "sdpa_bf16": 1.0}) == "sdpa"
    assert choice.decide({"sdpa": 1.2, "sdpa_bf16": 1.0}) == "sdpa_bf16"
    assert choice.decide({}, {"sdpa_bf16": "wrong"}) == "sdpa"
    assert choice.decide({}) == "dequant"
    with pytest.raises(ValueError):
        choice.Measurement.from_dict({"choice": "flash9", "times": {}, "dropped": {}})


def test_a_quantized_pipeline_runs_it_and_a_saved_one_loads_with_it(monkeypatch, tmp_path):
    import dq
    from dq.engine import find_denoiser
    from dq.testing.tiny import default_call_kwargs, tiny_pipeline

    favour_races(monkeypatch, "sdpa_bf16")
    pipe = tiny_pipeline("pixart")
    dq.quantize(pipe, "w4a16")  # weight-only: no calibration
    _, model = find_denoiser(pipe)
    processors = [m.processor for m in model.modules() if isinstance(m, Attention)]
    assert processors and all(isinstance(p, B.BF16AttnProcessor) for p in processors)
    kw = {**default_call_kwargs("pixart"), "num_inference_steps": 2}
    expected = pipe(prompt=["a red circle"], generator=torch.Generator().manual_seed(0), **kw).images
    assert set().union(*(p.paths.values() for p in processors)) == {"sdpa_bf16"}
    loaded = dq.load(dq.save(pipe, tmp_path / "q"))
    _, model = find_denoiser(loaded)
    assert all(isinstance(m.processor, B.BF16AttnProcessor) for m in model.modules() if isinstance(m, Attention))
    got = loaded(prompt=["a red circle"], generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.equal(torch.as_tensor(got), torch.as_tensor(expected))
    # the recipe stored in the checkpoint says so; turned off on the loaded model, float32 cores again
    assert model._dq_recipe.attention_bf16_where_faster is True
    set_execution(model, "real", attention_bf16=False)
    assert not any(isinstance(m.processor, B.BF16AttnProcessor) for m in model.modules() if isinstance(m, Attention))
