"""CLIP score with dq's evaluator CLIP, attribute accuracy, and FID on CLIP features (offline)."""

import numpy as np
import pytest
import torch

from dq.eval.attributes import attribute_accuracy
from dq.eval.clip import clip_score, load_clip
from dq.eval.errors import EvalError, MissingWeightsError
from dq.eval.fid import FidScorer, fid
from dq.eval.metrics import to_pil
from dq_pipelines.default import shapes


@pytest.fixture(scope="module")
def clip():
    return load_clip()


def _render(scenes, seed):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([shapes.render(s, rng=rng) for s in scenes])).permute(
        0, 3, 1, 2
    )


def _scenes(n, seed, **kwargs):
    rng = np.random.default_rng(seed)
    return [shapes.sample_scene(rng, **kwargs) for _ in range(n)]


def test_clip_score_is_per_image_in_range_and_prefers_the_right_prompt(clip):
    scenes = _scenes(24, seed=11)
    images = _render(scenes, seed=12)
    prompts = [s.caption() for s in scenes]
    scores = clip_score(images, prompts, clip, reduction="none")
    assert scores.shape == (24,)
    assert float(scores.min()) >= 0.0 and float(scores.max()) <= 100.0
    shuffled = prompts[1:] + prompts[:1]  # every image gets another scene's caption
    assert clip_score(images, prompts, clip) > clip_score(images, shuffled, clip) + 5
    assert clip_score(images, prompts, clip).item() == pytest.approx(scores.mean().item(), rel=1e-5)


def test_clip_score_matches_the_open_clip_formula(clip):
    scenes = _scenes(4, seed=3)
    images = _render(scenes, seed=4)
    prompts = [s.caption() for s in scenes]
    pixels = torch.stack([clip.preprocess(im) for im in to_pil(images)])
    with torch.no_grad():
        image_emb = torch.nn.functional.normalize(clip.model.encode_image(pixels), dim=-1)
        text_emb = torch.nn.functional.normalize(
            clip.model.encode_text(clip.tokenizer(prompts)), dim=-1
        )
    expected = 100 * (image_emb * text_emb).sum(-1).clamp(min=0)
    assert torch.allclose(clip_score(images, prompts, clip, reduction="none"), expected, atol=1e-4)


def test_clip_score_rejects_mismatched_inputs(clip):
    images = _render(_scenes(2, seed=0), seed=0)
    with pytest.raises(EvalError, match="2 images but 3 prompts"):
        clip_score(images, ["a red circle"] * 3, clip)
    with pytest.raises(EvalError, match="no prompts"):
        clip_score(images, [], clip)


def test_load_clip_errors_name_the_fix(tmp_path):
    with pytest.raises(MissingWeightsError, match="--clip-pretrained"):
        load_clip("ViT-B-32", str(tmp_path / "missing.safetensors"))
    with pytest.raises(EvalError, match="--clip-model"):
        load_clip(None, "laion2b_s34b_b79k")


def test_attribute_accuracy_is_high_on_renders_and_low_on_wrong_prompts(clip):
    scenes = _scenes(40, seed=21)
    images = _render(scenes, seed=22)
    result = attribute_accuracy(images, [s.caption() for s in scenes], clip)
    assert result.accuracy >= 0.95
    assert set(result.per_slot) == {"colour0", "shape0", "relation", "colour1", "shape1"}
    assert result.num_images == 40 and result.num_skipped == 0
    wrong = [_change_colour(s).caption() for s in scenes]
    assert attribute_accuracy(images, wrong, clip).per_slot["colour0"] <= 0.1


def test_attribute_accuracy_skips_prompts_outside_the_grammar(clip):
    scenes = _scenes(3, seed=5)
    images = _render(scenes, seed=6)
    prompts = [scenes[0].caption(), "a photo of a cat", scenes[2].caption()]
    result = attribute_accuracy(images, prompts, clip)
    assert result.num_images == 2 and result.num_skipped == 1
    assert attribute_accuracy(images, ["a cat"] * 3, clip) is None


def test_symmetric_scenes_accept_either_relation(clip):
    circle = shapes.Obj("red", "circle")
    scene = shapes.Scene((circle, circle), "above")
    result = attribute_accuracy(_render([scene], seed=0), [scene.caption()], clip)
    assert result.per_slot["relation"] == 1.0  # "below" draws the same picture


def test_fid_on_clip_features_is_zero_for_a_set_against_itself(clip):
    a = _render(_scenes(32, seed=31), seed=32)
    b = _render(_scenes(32, seed=33, max_objects=1), seed=34)
    scorer = FidScorer(a, features="clip", clip=clip)
    same, different = scorer(a), scorer(b)
    assert abs(same) < 1e-2
    assert different > 0.05 and different > 100 * abs(same)
    assert fid(a, b, features="clip", clip=clip) == pytest.approx(different, rel=1e-4)


def test_fid_needs_two_images(clip):
    a = _render(_scenes(4, seed=1), seed=1)
    with pytest.raises(EvalError, match="at least 2"):
        FidScorer(a[:1], features="clip", clip=clip)
    with pytest.raises(EvalError, match="at least 2"):
        FidScorer(a, features="clip", clip=clip)(a[:1])


def _change_colour(scene):
    first = scene.objects[0]
    other = next(c for c in shapes.COLOURS if c != first.colour)
    return shapes.Scene((shapes.Obj(other, first.shape), *scene.objects[1:]), scene.relation)
