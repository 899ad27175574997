"""Tests of the embedded default pipeline: the shapes grammar and the shipped model."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "pipelines" / "default" / "model"


def _import_shapes():
    """``dq_pipelines.default.shapes`` when installed, else the source tree's ``pipelines``."""
    try:
        return importlib.import_module("dq_pipelines.default.shapes")
    except ImportError:
        sys.path.insert(0, str(REPO))
        return importlib.import_module("pipelines.default.shapes")


shapes = _import_shapes()


def test_every_caption_round_trips() -> None:
    captions = shapes.all_captions()
    assert len(captions) == len(set(captions)) == 18 + 18 * 4 * 18
    for caption in captions[::7]:
        assert shapes.parse_caption(caption).caption() == caption


def test_sampled_scenes_round_trip_and_parse_forgives_case() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = shapes.sample_scene(rng)
        assert shapes.parse_caption(scene.caption()) == scene
    assert shapes.parse_caption("  A Red  Circle above a blue square. ").relation == "above"


@pytest.mark.parametrize(
    "bad", ["", "a red", "a pink circle", "a red circle near a blue square", "red circle"]
)
def test_parse_rejects_captions_outside_grammar(bad: str) -> None:
    with pytest.raises(ValueError, match="outside the grammar"):
        shapes.parse_caption(bad)


def test_vocabulary_covers_every_caption() -> None:
    vocab = set(shapes.vocabulary())
    assert all(set(c.split()) <= vocab for c in shapes.all_captions())


def test_render_shape_dtype_and_colours() -> None:
    scene = shapes.parse_caption("a red circle above a blue square")
    image = shapes.render(scene, size=64)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    top, bottom = image[16, 32], image[48, 32]
    assert tuple(top) == shapes.COLOURS["red"] and tuple(bottom) == shapes.COLOURS["blue"]
    assert np.array_equal(image, shapes.render(scene, size=64)), (
        "rendering without rng is canonical"
    )
    jittered = [shapes.render(scene, size=64, rng=np.random.default_rng(s)) for s in (0, 0, 1)]
    assert np.array_equal(jittered[0], jittered[1]) and not np.array_equal(jittered[0], jittered[2])


def test_attribute_variants() -> None:
    scene = shapes.parse_caption("a red circle to the left of a blue square")
    variants = shapes.attribute_variants(scene)
    assert list(variants) == ["colour0", "shape0", "relation", "colour1", "shape1"]
    assert len(variants["colour0"]) == len(shapes.COLOURS)
    assert len(variants["relation"]) == len(shapes.RELATIONS)
    for slot, alternatives in variants.items():
        assert scene in alternatives, slot
        assert len(set(alternatives)) == len(alternatives)
    assert [v.objects[1].shape for v in variants["shape1"]] == list(shapes.SHAPES)
    assert all(v.objects[0] == scene.objects[0] for v in variants["shape1"])
    single = shapes.attribute_variants(shapes.parse_caption("a green triangle"))
    assert list(single) == ["colour0", "shape0"]


@pytest.mark.skipif(not (MODEL_DIR / "model_index.json").exists(), reason="no shipped model")
def test_shipped_pipeline_generates() -> None:
    torch = pytest.importorskip("torch")
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(MODEL_DIR)
    pipe.set_progress_bar_config(disable=True)
    assert not pipe.text_encoder.training
    out = pipe(
        "a red circle above a blue square",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert out.shape == (1, 256, 256, 3)
    assert np.isfinite(out).all()


@pytest.mark.skipif(not (MODEL_DIR / "vae").exists(), reason="no shipped model")
def test_training_script_can_train_the_text_encoder_and_saves_a_loadable_pipeline(tmp_path) -> None:
    """A few steps of pipelines/default/train.py (shipped VAE reused) with --text-lr: the text
    encoder is trained with the transformer, and the saved pipeline loads and generates."""
    torch = pytest.importorskip("torch")
    from diffusers import DiffusionPipeline

    sys.path.insert(0, str(REPO))
    train = importlib.import_module("pipelines.default.train")
    build = importlib.import_module("pipelines.default.build")
    cfg = train.parse_args([
        "--num-images", "16", "--workers", "1", "--vae-from", str(MODEL_DIR / "vae"),
        "--dit-steps", "3", "--dit-batch", "4", "--warmup-steps", "1", "--save-every", "3",
        "--no-preview", "--out", str(tmp_path / "model"), "--cache-dir", str(tmp_path / "cache"),
        "--threads", "1", "--text-lr", "1e-3", "--text-steps", "0",
    ])
    assert cfg.text_lr > 0 and cfg.preview is False
    with pytest.raises(SystemExit, match="vae-from"):
        train.train(train.parse_args(["--vae-from", str(tmp_path / "nowhere"), "--threads", "1"]))
    train.train(cfg)
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "model")
    initial = build.build_components(build.PipelineConfig(seed=cfg.seed))["text_encoder"]
    moved = [
        not torch.equal(a, b)
        for a, b in zip(initial.state_dict().values(), pipe.text_encoder.state_dict().values(), strict=True)
    ]
    assert any(moved), "text_lr > 0 must train the text encoder"
    assert pipe.vae.config.scaling_factor != 1.0  # measured on the latents
    out = pipe("a red circle", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    assert np.isfinite(out.images).all()


def _import_pipeline_module(name: str):
    sys.path.insert(0, str(REPO))
    return importlib.import_module(f"pipelines.default.{name}")


def test_layout_targets_depend_on_the_picture_not_the_wording() -> None:
    text_pretrain = _import_pipeline_module("text_pretrain")
    targets = text_pretrain.layout_targets
    same = targets("a red circle above a blue square")
    assert same == targets("a blue square below a red circle")
    assert same != targets("a blue circle above a red square")
    assert same != targets("a red circle to the left of a blue square")
    assert targets("") == [0] * 10  # the empty prompt draws nothing
    single = targets("a green triangle")
    slots = text_pretrain.LAYOUT_SLOTS
    assert single[slots.index("centre")] == 1 + list(shapes.COLOURS).index("green")
    assert single[len(slots) + slots.index("centre")] == 1 + list(shapes.SHAPES).index("triangle")
    assert sum(v > 0 for v in single) == 2


def test_text_pretraining_teaches_the_layout_and_freezes_the_encoder() -> None:
    torch = pytest.importorskip("torch")
    build = _import_pipeline_module("build")
    text_pretrain = _import_pipeline_module("text_pretrain")
    torch.manual_seed(0)
    tokenizer = build.build_tokenizer()
    encoder = build.build_text_encoder(build.TextEncoderConfig(), vocab_size=len(tokenizer))
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    torch.set_num_threads(1)
    result = text_pretrain.pretrain_text_encoder(encoder, tokenizer, steps=40, lr=3e-3)
    # untrained, the ten heads start at about ln(7)/ln(4) nats: 1.67 on average
    assert result.layout_loss < 0.8, result
    assert not encoder.training
    assert not any(p.requires_grad for p in encoder.parameters())
    assert any(not torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    with pytest.raises(ValueError, match="steps must be positive"):
        text_pretrain.pretrain_text_encoder(encoder, tokenizer, steps=0)
    with pytest.raises(ValueError, match="heldout"):
        text_pretrain.pretrain_text_encoder(encoder, tokenizer, heldout=1.0)


@pytest.mark.skipif(not (MODEL_DIR / "transformer").exists(), reason="no shipped model")
def test_training_script_fine_tunes_from_a_pipeline(tmp_path) -> None:
    """--init-from starts the transformer and text encoder from a pipeline folder; a bad folder
    is a clear error before any rendering."""
    torch = pytest.importorskip("torch")
    from diffusers import DiffusionPipeline, PixArtTransformer2DModel

    train = _import_pipeline_module("train")
    with pytest.raises(SystemExit, match="init-from"):
        train.train(train.parse_args(["--init-from", str(tmp_path), "--threads", "1"]))
    cfg = train.parse_args([
        "--num-images", "8", "--workers", "1", "--vae-from", str(MODEL_DIR / "vae"),
        "--init-from", str(MODEL_DIR), "--text-steps", "2", "--dit-steps", "1",
        "--dit-batch", "4", "--dit-lr", "1e-12", "--warmup-steps", "1", "--save-every", "1",
        "--no-preview", "--out", str(tmp_path / "model"), "--cache-dir", str(tmp_path / "cache"),
        "--threads", "1",
    ])
    train.train(cfg)
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "model")
    shipped = PixArtTransformer2DModel.from_pretrained(MODEL_DIR / "transformer")
    for (name, a), b in zip(shipped.state_dict().items(), pipe.transformer.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    assert not pipe.text_encoder.training

    # a second run reuses the first one's encoded dataset and, with --text-steps 0, its encoder
    with pytest.raises(SystemExit, match="latents-from"):
        train.train(train.parse_args(["--latents-from", str(tmp_path / "none.pt"), "--threads", "1"]))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="not a latents.pt"):
        train.train(train.parse_args([
            "--latents-from", str(tmp_path / "bad.pt"), "--vae-from", str(MODEL_DIR / "vae"),
            "--dit-steps", "1", "--threads", "1", "--out", str(tmp_path / "never"),
        ]))
    with pytest.raises(SystemExit, match="timestep-power"):
        train.train(train.parse_args(["--timestep-power", "0", "--threads", "1"]))
    again = train.parse_args([
        "--latents-from", str(tmp_path / "cache" / "latents.pt"), "--vae-from", str(tmp_path / "model" / "vae"),
        "--init-from", str(tmp_path / "model"), "--text-steps", "0", "--timestep-power", "2",
        "--dit-steps", "1", "--dit-batch", "4", "--warmup-steps", "1", "--save-every", "1",
        "--no-preview", "--out", str(tmp_path / "model2"), "--cache-dir", str(tmp_path / "cache2"),
        "--threads", "1",
    ])
    train.train(again)
    second = DiffusionPipeline.from_pretrained(tmp_path / "model2")
    for a, b in zip(pipe.text_encoder.state_dict().values(), second.text_encoder.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert second.vae.config.scaling_factor == pipe.vae.config.scaling_factor


@pytest.mark.skipif(not (MODEL_DIR / "vae").exists(), reason="no shipped model")
def test_training_script_trains_at_a_smaller_image_size(tmp_path) -> None:
    """--image-size 128 renders and encodes 128 px scenes (16x16 latents) and trains the same
    transformer on them; a size the model cannot take, or no trained VAE, is a clear error."""
    torch = pytest.importorskip("torch")
    from diffusers import DiffusionPipeline
    from PIL import Image

    train = _import_pipeline_module("train")
    for bad in ("100", "32", "512"):
        with pytest.raises(SystemExit, match="multiple of 16 from 64 to 256"):
            train.train(train.parse_args(["--image-size", bad, "--threads", "1"]))
    with pytest.raises(SystemExit, match="needs --vae-from"):
        train.train(train.parse_args(["--image-size", "128", "--threads", "1"]))
    cfg = train.parse_args([
        "--image-size", "128", "--num-images", "8", "--workers", "1",
        "--vae-from", str(MODEL_DIR / "vae"), "--dit-steps", "1", "--dit-batch", "4",
        "--warmup-steps", "1", "--save-every", "1", "--out", str(tmp_path / "model"),
        "--cache-dir", str(tmp_path / "cache"), "--threads", "1",
    ])
    train.train(cfg)
    cached = torch.load(tmp_path / "cache" / "latents.pt")
    assert cached["latents"].shape == (8, 4, 16, 16)
    preview = Image.open(tmp_path / "cache" / "preview_step1.png")
    assert preview.size == (128 * len(train.PREVIEW_PROMPTS), 128)
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "model")
    out = pipe("a red circle", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 256, 256, 3)
