"""The `dq` command line: quantize, generate, eval, recipes."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .errors import CalibrationError, DQError

logger = logging.getLogger("dq")

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}


def _dtype(name: str | None):
    import torch

    if name is None:
        return None
    if name not in DTYPES:
        raise DQError(f"unknown dtype {name!r}; choose one of {sorted(set(DTYPES))}")
    return getattr(torch, DTYPES[name])


def _add_model_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("model", nargs="?", default=None, help=f"{what}; omitted: the embedded default pipeline")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda")
    p.add_argument("--dtype", default=None, help="torch dtype of the loaded pipeline (float32, bfloat16, float16)")


def cmd_quantize(args: argparse.Namespace) -> int:
    from . import engine, io

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise DQError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    recipe = _recipe_with_overrides(args)
    pipe = io.open_pipeline(args.model, torch_dtype=_dtype(args.dtype), device=args.device)
    engine.quantize(pipe, recipe, calib_prompts=args.calib_prompts, num_inference_steps=args.steps)
    io.save(pipe, out, overwrite=args.overwrite)
    print(f"quantized with recipe {recipe.name!r} -> {out}")
    return 0


def _recipe_with_overrides(args: argparse.Namespace):
    return recipe_with_overrides(args.recipe, num_prompts=args.num_prompts)


def recipe_with_overrides(recipe, *, num_prompts: int | None = None):
    """``Recipe.from_any(recipe)`` with ``--num-prompts`` (the calibration prompt count) applied;
    shared by the CLI and app.py."""
    from .recipe import Recipe

    chosen = Recipe.from_any(recipe)
    if num_prompts is None:
        return chosen
    if num_prompts < 1:
        raise DQError(f"--num-prompts must be at least 1, got {num_prompts}")
    return Recipe.from_dict({**chosen.to_dict(), "calib_num_prompts": num_prompts})


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from . import io
    from .calibrate.run import prompt_kwargs

    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise DQError(f"--out {out} must end in .png, .jpg or .webp")
    pipe = io.open_pipeline(args.model, torch_dtype=_dtype(args.dtype), device=args.device)
    kwargs = {}
    if args.steps is not None:
        kwargs["num_inference_steps"] = args.steps
    if args.guidance_scale is not None:
        kwargs["guidance_scale"] = args.guidance_scale
    device = getattr(pipe, "_execution_device", None) or "cpu"
    generator = torch.Generator(device=device).manual_seed(args.seed)
    image = pipe(**prompt_kwargs(pipe, [args.prompt]), generator=generator, **kwargs).images[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{out.suffix}")
    image.save(tmp)
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from .recipe import preset, recipes

    for name in recipes():
        print(f"{name:10s} {preset(name).description}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    import json

    import torch

    from .kernels import doctor

    widths = [int(w) for w in args.widths.split(",") if w.strip()]
    if not widths or min(widths) < 1 or args.rows < 1:
        raise DQError(f"--widths needs positive integers (got {args.widths!r}) and --rows at least 1 (got {args.rows})")
    if args.threads is not None:
        if args.threads < 1:
            raise DQError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    rows = doctor.measure_table(widths, args.rows)
    print(doctor.render(rows))
    if args.json:
        from .kernels import choice

        body = {"machine": choice.machine(), "rows": [r.__dict__ | {"speedup": r.speedup} for r in rows]}
        Path(args.json).write_text(json.dumps(body, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dq", description="Timestep-aware quantization of diffusers pipelines")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="calibrate and quantize a pipeline, save it as a diffusers folder")
    _add_model_args(q, "hub id or local diffusers folder")
    q.add_argument("--recipe", default="w8a8", help="preset name (see `dq recipes`) or a .yaml/.json recipe file")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--calib-prompts", default=None, help="prompt file (one per line) or shipped set name")
    q.add_argument("--num-prompts", type=int, default=None, help="calibration prompts to use (default: the recipe's)")
    q.add_argument("--steps", type=int, default=None, help="sampler steps per calibration prompt")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    q.set_defaults(func=cmd_quantize)

    g = sub.add_parser("generate", help="generate one image")
    _add_model_args(g, "hub id, diffusers folder or dq-quantized folder")
    g.add_argument("--prompt", required=True)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--guidance-scale", type=float, default=None)
    g.add_argument("--out", required=True, help="image file (.png)")
    g.set_defaults(func=cmd_generate)

    r = sub.add_parser("recipes", help="list the preset recipes")
    r.set_defaults(func=cmd_recipes)

    d = sub.add_parser("doctor", help="this machine's kernel table: each path's time per layer shape and the choice")
    d.add_argument("--widths", default="128,512,1152", help="comma-separated layer widths (square linear layers)")
    d.add_argument("--rows", type=int, default=256, help="rows (tokens x batch) per call")
    d.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    d.add_argument("--json", default=None, help="also write the table as JSON to this file")
    d.set_defaults(func=cmd_doctor)

    try:
        from .eval.cli import add_eval_parser, run_eval
    except ImportError as exc:  # evaluation extras not installed
        e = sub.add_parser("eval", help="evaluate a pipeline (needs: pip install 'dq[eval]')")
        e.set_defaults(func=lambda _a, exc=exc: _missing_eval(exc))
    else:
        add_eval_parser(sub)
        sub.choices["eval"].set_defaults(func=run_eval)
    return parser


def _missing_eval(exc: Exception) -> int:
    raise DQError(f"`dq eval` needs the evaluation extras: pip install 'dq[eval]' ({exc})")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (DQError, CalibrationError) as exc:
        print(f"dq: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
