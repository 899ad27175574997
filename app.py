"""Full precision and dq-quantized side by side, in a Gradio app.

    python app.py                                   # embedded default pipeline, quantized to w8a8 at start
    python app.py --recipe w4a8                     # another preset
    python app.py --quantized out/w8a8              # a folder written by `dq quantize --out`
    python app.py PixArt-alpha/PixArt-XL-2-512x512 --recipe w8a8 --device cuda

Each prompt is drawn by both pipelines from the same seed; the page shows the two images, each
one's time, the quantized image's PSNR and SSIM against the full-precision one, and the
denoiser's weight bytes. `pip install "dq[app]"` installs Gradio.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import dq
from dq.cli import recipe_with_overrides
from dq.engine import find_denoiser
from dq.errors import DQError
from dq.eval.metrics import psnr, ssim
from dq.io import is_dq_folder
from dq.provenance import made_from
from dq.quant.packing import weight_nbytes

logger = logging.getLogger("dq.app")

EXAMPLES = [
    "a red circle above a blue square",
    "a green triangle to the left of a yellow circle",
    "a purple square",
]


@dataclass
class Side:
    """One of the two pipelines the app compares."""

    name: str
    pipe: object
    weight_bytes: int


@dataclass
class Comparison:
    full: object  # PIL image
    quantized: object
    report: str  # markdown
    seconds: tuple[float, float]
    psnr_db: float
    ssim: float


class SideBySide:
    """The full-precision pipeline and its quantized copy, and the comparison of one prompt."""

    def __init__(self, full: Side, quantized: Side, *, default_steps: int | None = None):
        self.full, self.quantized = full, quantized
        self.default_steps = default_steps

    def compare(
        self,
        prompt: str,
        seed: int = 0,
        steps: int | None = None,
        guidance_scale: float | None = None,
    ) -> Comparison:
        prompt = (prompt or "").strip()
        if not prompt:
            raise ValueError(
                "the prompt is empty; type what to draw, e.g. 'a red circle above a blue square'"
            )
        steps = int(steps) if steps else self.default_steps
        if steps is not None and steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        kwargs = {"num_inference_steps": steps} if steps else {}
        if guidance_scale is not None:
            kwargs["guidance_scale"] = float(guidance_scale)
        images, seconds = [], []
        for side in (self.full, self.quantized):
            generator = torch.Generator("cpu").manual_seed(int(seed))
            start = time.perf_counter()
            with torch.inference_mode():
                images.append(side.pipe(prompt, generator=generator, **kwargs).images[0])
            seconds.append(time.perf_counter() - start)
        db = float(psnr([images[1]], [images[0]]))
        similarity = float(ssim([images[1]], [images[0]]))
        ratio = self.quantized.weight_bytes / max(1, self.full.weight_bytes)
        report = "\n".join(
            [
                "| | time | denoiser weights |",
                "|---|---|---|",
                f"| {self.full.name} | {seconds[0]:.2f} s | {self.full.weight_bytes / 2**20:.2f} MiB |",
                f"| {self.quantized.name} | {seconds[1]:.2f} s | "
                f"{self.quantized.weight_bytes / 2**20:.2f} MiB ({ratio:.2f}x) |",
                "",
                f"Quantized against full precision, same seed: PSNR **{db:.2f} dB**, SSIM **{similarity:.4f}**.",
            ]
        )
        return Comparison(images[0], images[1], report, (seconds[0], seconds[1]), db, similarity)


def load_sides(
    model: str | None,
    *,
    recipe: str = "w8a8",
    quantized: str | None = None,
    num_prompts: int | None = None,
    steps: int | None = None,
    device: str | None = None,
) -> SideBySide:
    """Open the full-precision pipeline; quantize a second copy with ``recipe`` (calibrated with
    ``num_prompts`` prompts and ``steps`` sampler steps) or load ``quantized``, a dq folder."""
    if model is not None and is_dq_folder(model):
        raise DQError(
            f"{model} is already quantized; pass the full-precision model as MODEL and the dq "
            f"folder as --quantized {model}"
        )
    if quantized is not None and not is_dq_folder(quantized):
        raise DQError(
            f"--quantized {quantized}: not a folder written by `dq quantize --out` / dq.save; "
            "leave it out to quantize at start with --recipe"
        )
    full = dq.open_pipeline(model, device=device)
    if quantized is not None:
        q_pipe = dq.load(quantized, device=device)
        q_name = f"dq {_recipe_name(q_pipe) or 'quantized'} ({Path(quantized).name})"
        # the same weights (hash recorded at quantization; older folders: the same architecture)
        if _architecture(full) != _architecture(q_pipe) or made_from(find_denoiser(q_pipe)[1], find_denoiser(full)[1]) is False:
            raise DQError(
                f"--quantized {quantized} was made from another model than "
                f"{model or 'the embedded default'}; pass the full-precision model it was "
                "quantized from as MODEL"
            )
    else:
        chosen = recipe_with_overrides(recipe, num_prompts=num_prompts)
        q_pipe = dq.open_pipeline(model, device=device)
        dq.quantize(q_pipe, chosen, num_inference_steps=steps)
        q_name = f"dq {chosen.name}"
    for pipe in (full, q_pipe):
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
    return SideBySide(
        Side("full precision", full, weight_nbytes(find_denoiser(full)[1])),
        Side(q_name, q_pipe, weight_nbytes(find_denoiser(q_pipe)[1])),
        default_steps=steps,
    )


def _architecture(pipe) -> tuple[str, dict]:
    """The denoiser's class and config, without what quantization adds."""
    model = find_denoiser(pipe)[1]
    config = dict(getattr(model, "config", {}) or {})
    return type(model).__name__, {
        k: v for k, v in config.items() if k != "quantization_config" and not k.startswith("_")
    }


def _recipe_name(pipe) -> str | None:
    recipe = getattr(find_denoiser(pipe)[1], "_dq_recipe", None)
    return recipe.name if recipe is not None else None


def build_demo(sides: SideBySide):
    """The Gradio page (``gradio.Blocks``) around ``sides.compare``."""
    import gradio as gr

    def run(prompt: str, seed: float, steps: float, guidance: float):
        try:
            result = sides.compare(prompt, int(seed), int(steps) if steps else None, guidance)
        except (ValueError, DQError) as error:
            raise gr.Error(str(error)) from error
        return result.full, result.quantized, result.report

    with gr.Blocks(title="dq: full precision vs quantized") as demo:
        gr.Markdown(f"## {sides.full.name} vs {sides.quantized.name}")
        with gr.Row():
            prompt = gr.Textbox(label="prompt", value=EXAMPLES[0], scale=4)
            button = gr.Button("generate", variant="primary", scale=1)
        with gr.Row():
            seed = gr.Number(label="seed", value=0, precision=0)
            steps = gr.Slider(1, 50, value=sides.default_steps or 20, step=1, label="steps")
            guidance = gr.Slider(1.0, 10.0, value=4.5, step=0.5, label="guidance scale")
        with gr.Row():
            full = gr.Image(label=sides.full.name, type="pil")
            quantized = gr.Image(label=sides.quantized.name, type="pil")
        report = gr.Markdown()
        gr.Examples(EXAMPLES, inputs=prompt)
        inputs, outputs = [prompt, seed, steps, guidance], [full, quantized, report]
        button.click(run, inputs, outputs)
        prompt.submit(run, inputs, outputs)
    return demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="hub id or diffusers folder (default: the embedded default pipeline)",
    )
    parser.add_argument(
        "--recipe",
        default="w8a8",
        help="preset name or recipe file used to quantize at start (default: w8a8)",
    )
    parser.add_argument(
        "--quantized", default=None, help="a dq folder to compare instead of quantizing at start"
    )
    parser.add_argument(
        "--num-prompts", type=int, default=None, help="calibration prompts (default: the recipe's)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="sampler steps for calibration and the page's default",
    )
    parser.add_argument(
        "--device", default=None, help="e.g. cuda (default: where the pipeline loads, the CPU)"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="a public Gradio link")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ImportError:
        sys.exit('app.py needs Gradio: pip install "dq[app]" (or pip install gradio)')
    try:
        sides = load_sides(
            args.model,
            recipe=args.recipe,
            quantized=args.quantized,
            num_prompts=args.num_prompts,
            steps=args.steps,
            device=args.device,
        )
    except DQError as error:
        sys.exit(f"app.py: {error}")
    build_demo(sides).launch(server_name=args.host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
