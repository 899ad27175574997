"""The `dq` command line: quantize, generate, eval, recipes."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from .errors import CalibrationError, DQError, one_line

logger = logging.getLogger("dq")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``dq quantize: error: ... (see dq quantize --help)``,
    exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# argparse `type=` checkers: wrong values are refused before any work, exit status 2.
def positive_int(text: str) -> int:
    """An integer >= 1 (0 is an error, not "not given")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (1 or more), got {value}")
    return value


def seed_int(text: str) -> int:
    """A random seed: an integer from 0 to 2**63 - 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 2**63-1, got {value}")
    return value


def guidance_float(text: str) -> float:
    """A finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def budget_float(text: str) -> float:
    """Average weight bits: a finite number > 0 (the achievable range is checked against the model)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of average weight bits such as 4.5, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of average weight bits such as 4.5, got {text!r}")
    return value


def memory_size(text: str) -> int:
    """A size: 2GB, 1.5GiB, 800MB or a number of bytes."""
    from .recipe import parse_memory

    try:
        return parse_memory(text, "--memory")
    except DQError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def check_writable(path: str | Path, option: str, *, folder: bool) -> Path:
    """Refuse an output path that cannot be written, before any work: a part of it that is a
    file, an existing file where a folder goes (or the reverse), or a parent where a probe file
    cannot be created and removed (read-only file system, /proc, no permission)."""
    path = Path(path).expanduser()
    if path.exists() and path.is_dir() != folder:
        raise DQError(f"{option} {path} is {'a file' if folder else 'a folder'}; give {'a folder' if folder else 'a file'} path")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise DQError(f"{option} {path}: {parent} is a file, not a folder; choose another {option}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".dq-write-probe.", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise DQError(f"{option} {path}: cannot write in {parent} ({exc.strerror or exc}); choose a writable {option}") from None
    return path


def check_device(name: str | None) -> str | None:
    """Refuse a --device that does not exist on this machine, naming the ones that do."""
    if name is None:
        return None
    import torch

    available = ["cpu"]
    if torch.cuda.is_available():
        available += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        available.append("mps")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DQError(f"unknown --device {name!r}; use one of {available}") from None
    if device.type == "cpu":
        return name
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DQError(f"--device {name}: no CUDA device is available on this machine; use one of {available}")
        if device.index is not None and device.index >= count:
            raise DQError(f"--device {name}: this machine has {count} CUDA device(s); use one of {available}")
        return name
    if device.type == "mps":
        if "mps" not in available:
            raise DQError(f"--device {name}: Apple MPS is not available on this machine; use one of {available}")
        return name
    backend = getattr(torch, device.type, None)
    is_available = getattr(backend, "is_available", None)
    if not callable(is_available) or not is_available():
        raise DQError(f"--device {name}: no {device.type} device is available on this machine; use one of {available}")
    return name


def _looks_like_path(model: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else with a slash, a leading dot or ~,
    or that exists, is a path."""
    return (
        model.startswith(("/", ".", "~"))
        or model.count("/") >= 2
        or model.endswith("/")
        or "\\" in model
        or os.path.exists(model)
    )


def check_model(model: str | None, option: str = "MODEL") -> None:
    """A MODEL that looks like a path must be a pipeline folder (with model_index.json)."""
    if model is None or not _looks_like_path(model):
        return
    path = Path(model).expanduser()
    if not path.exists():
        raise DQError(
            f"cannot load pipeline {model!r}: no such folder; give a diffusers or dq folder, a hub id "
            f"(org/name), or omit {option} for the embedded default pipeline"
        )
    if not path.is_dir():
        raise DQError(f"cannot load pipeline {model!r}: it is a file; give the pipeline's folder (the one with model_index.json)")
    if not (path / "model_index.json").is_file():
        raise DQError(f"cannot load pipeline {model!r}: the folder has no model_index.json; give a diffusers or dq pipeline folder")


def open_model(model: str | None, *, option: str = "MODEL", **kwargs: Any):
    """`dq.io.open_pipeline` for the command line (`option` names the argument in messages); a
    damaged checkpoint is a DQError naming the file there (`dq.io.checkpoint_errors`)."""
    from . import io

    try:
        return io.open_pipeline(model, **kwargs)
    except DQError as exc:
        if option == "MODEL" or str(exc).startswith(option):
            raise
        raise DQError(f"{option}: {exc}") from exc


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
    p.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 or mps (checked to exist)")
    p.add_argument("--dtype", default=None, help="torch dtype of the loaded pipeline (float32, bfloat16, float16)")


def add_text_encoder_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-encoders", default=None, metavar="RECIPE",
                   help="also quantize the pipeline's text encoders weight-only after loading: w8a16 or w4a16 (they are "
                   "never saved quantized; most of the memory of PixArt, SD3 and FLUX pipelines is the T5)")


def check_text_encoders(name: str | None):
    """The weight-only recipe of ``--text-encoders`` (None when not given), checked before any loading."""
    if name is None:
        return None
    from .recipe import Recipe
    from .text_encoders import check_weight_only

    recipe = Recipe.from_any(name)
    check_weight_only(recipe)
    return recipe


def quantize_text_encoders_of(pipe, recipe) -> None:
    """``--text-encoders``: quantize the loaded pipeline's text encoders (a pipeline without any is an error)."""
    if recipe is not None:
        from .text_encoders import quantize_text_encoders

        quantize_text_encoders(pipe, recipe)


def _add_calibration_args(p: argparse.ArgumentParser) -> None:
    """The model, recipe and calibration options `dq quantize` and `dq calibrate` share."""
    _add_model_args(p, "hub id or local diffusers folder")
    p.add_argument("--recipe", default="w8a8", help="preset name (see `dq recipes`) or a .yaml/.json recipe file")
    p.add_argument("--calib-prompts", default=None, help="prompt file (one per line) or shipped set name")
    p.add_argument("--num-prompts", type=positive_int, default=None, help="calibration prompts to use (default: the recipe's)")
    p.add_argument("--steps", type=positive_int, default=None, help="sampler steps per calibration prompt (default: the recipe's)")


def add_output_args(p: argparse.ArgumentParser) -> None:
    """--verbose / --quiet on a sub-command (they may also come before it: ``dq -q quantize``)."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="debug lines from dq and all third-party output (progress bars, warnings)")
    group.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                       help="warnings only: print nothing but the final result line")


def cmd_quantize(args: argparse.Namespace) -> int:
    # every check first (cheap ones before importing torch), then the work
    out = check_writable(args.out, "--out", folder=True)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise DQError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    check_model(args.model)
    if args.calib_prompts is not None:
        from .prompts import load_prompts

        load_prompts(args.calib_prompts)  # DQError for a missing or empty prompt file
    recipe = _recipe_with_overrides(args)
    dtype = _dtype(args.dtype)
    check_device(args.device)

    from . import engine, io
    from .calibrate import distributed
    from .logs import quiet_third_party

    device = distributed.join(args.device)  # under `accelerate launch`: this process's device
    distributed.check_agreement({"command line": lambda: sys.argv[1:], "recipe": recipe.to_dict})
    pipe = open_model(args.model, torch_dtype=dtype, device=device)
    engine.quantize(pipe, recipe, calib_prompts=args.calib_prompts, num_inference_steps=args.steps)
    if distributed.is_main():  # every process holds the same quantized model; one writes it
        with quiet_third_party():
            io.save(pipe, out, overwrite=args.overwrite)
        plan = getattr(engine.find_denoiser(pipe)[1], "_dq_mixed", None)
        if plan is not None:
            print(plan.table() if not getattr(args, "quiet", False) else plan.summary())
            if args.plot:
                from .mixed import plot_allocation

                print(f"per-layer plot -> {plot_allocation(plan.rows(), args.plot)}")
        print(f"quantized with recipe {recipe.name!r} -> {out}")
    distributed.barrier("the save")  # no process reports success before the checkpoint is complete
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Calibrate without quantizing: write the statistics file that ``DQConfig(stats=...)`` reads
    to quantize a recipe with static ranges at ``from_pretrained``."""
    out = check_writable(args.stats_out, "--stats-out", folder=False)
    if out.suffix != ".safetensors":
        raise DQError(f"--stats-out {out} must end in .safetensors")
    if out.exists() and not args.overwrite:
        raise DQError(f"{out} exists; choose another --stats-out or pass --overwrite")
    check_model(args.model)
    if args.calib_prompts is not None:
        from .prompts import load_prompts

        load_prompts(args.calib_prompts)
    recipe = _recipe_with_overrides(args)
    dtype = _dtype(args.dtype)
    check_device(args.device)

    from . import engine

    pipe = open_model(args.model, torch_dtype=dtype, device=args.device)
    cal = engine.calibrate_pipeline(pipe, recipe, calib_prompts=args.calib_prompts, num_inference_steps=args.steps,
                                   keep_stats=True)
    cal.save_stats(out)
    print(f"calibration statistics for recipe {recipe.name!r} -> {out}\n"
          f"quantize at load with: from_pretrained(..., quantization_config=dq.DQConfig(recipe=..., stats={str(out)!r}))")
    return 0


def _recipe_with_overrides(args: argparse.Namespace):
    plot, budget, memory = (getattr(args, k, None) for k in ("plot", "budget", "memory"))
    if plot is not None and budget is None and memory is None:
        raise DQError("--plot draws a mixed-precision plan: give --budget BITS or --memory SIZE too")
    if plot is not None:
        check_writable(plot, "--plot", folder=False)
    return recipe_with_overrides(args.recipe, num_prompts=args.num_prompts, budget=budget, memory=memory)


def recipe_with_overrides(recipe, *, num_prompts: int | None = None, budget: float | None = None, memory: int | str | None = None):
    """``Recipe.from_any(recipe)`` with ``--num-prompts`` (the calibration prompt count) and a
    mixed-precision ``--budget`` (average weight bits) or ``--memory`` (bytes) applied (either
    replaces the recipe's own budget and any solved allocation); shared by the CLI and app.py."""
    from .recipe import Recipe

    chosen = Recipe.from_any(recipe)
    if num_prompts is None and budget is None and memory is None:
        return chosen
    if num_prompts is not None and num_prompts < 1:
        raise DQError(f"--num-prompts must be at least 1, got {num_prompts}")
    data = chosen.to_dict()
    if num_prompts is not None:
        data["calib_num_prompts"] = num_prompts
    if budget is not None and memory is not None:
        raise DQError("give either --budget (average weight bits) or --memory (bytes), not both")
    if budget is not None or memory is not None:
        data.update(budget=budget, memory=memory, allocation=None)
    return Recipe.from_dict(data)


def cmd_generate(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise DQError(f"--out {out} must end in .png, .jpg or .webp")
    check_writable(out, "--out", folder=False)
    if not args.prompt.strip():
        raise DQError("--prompt is empty; give the text of the image to generate")
    check_model(args.model)
    dtype = _dtype(args.dtype)
    check_device(args.device)
    text_recipe = check_text_encoders(args.text_encoders)

    import torch

    from .calibrate.run import prompt_kwargs
    from .logs import quiet_third_party, show_progress

    pipe = open_model(args.model, torch_dtype=dtype, device=args.device)
    quantize_text_encoders_of(pipe, text_recipe)
    if not show_progress():
        pipe.set_progress_bar_config(disable=True)
    kwargs = {}
    if args.steps is not None:
        kwargs["num_inference_steps"] = args.steps
    if args.guidance_scale is not None:
        kwargs["guidance_scale"] = args.guidance_scale
    device = getattr(pipe, "_execution_device", None) or "cpu"
    generator = torch.Generator(device=device).manual_seed(args.seed)
    with quiet_third_party():
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

    import torch

    from .kernels import doctor

    widths = [int(w) for w in args.widths.split(",") if w.strip()]
    if not widths or min(widths) < 1 or args.rows < 1:
        raise DQError(f"--widths needs positive integers (got {args.widths!r}) and --rows at least 1 (got {args.rows})")
    if args.threads is not None:
        if args.threads < 1:
            raise DQError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.fresh:
        from .kernels import choice

        choice.cache().clear()
    tokens = [int(t) for t in args.attention_tokens.split(",") if t.strip()]
    if min(tokens, default=1) < 1:
        raise DQError(f"--attention-tokens needs positive integers or nothing, got {args.attention_tokens!r}")
    rows = doctor.measure_table(widths, args.rows)
    attention = doctor.measure_attention(tokens)
    gelus = doctor.measure_gelu(tokens)
    print(doctor.render(rows) + doctor.render_attention(attention) + doctor.render_gelu(gelus))
    if args.json:
        from .kernels import choice

        body = {"machine": choice.machine(), "rows": [r.__dict__ | {"speedup": r.speedup} for r in rows],
                "attention": [r.__dict__ | {"speedup": r.speedup} for r in attention],
                "gelu": [r.__dict__ | {"speedup": r.speedup} for r in gelus]}
        Path(args.json).write_text(json.dumps(body, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dq", description="Timestep-aware quantization of diffusers pipelines")
    add_output_args(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="calibrate and quantize a pipeline, save it as a diffusers folder")
    _add_calibration_args(q)
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    q.add_argument("--budget", type=budget_float, default=None, metavar="BITS",
                   help="mixed precision: average weight bits per layer weight, scales included (e.g. 4.5); "
                   "each layer gets one of the recipe's mixed.weights formats (default int4, int5, int6, int8) or float "
                   "by measured sensitivity")
    q.add_argument("--memory", type=memory_size, default=None, metavar="SIZE",
                   help="mixed precision: the quantized denoiser's size at most SIZE (2GB, 1.5GiB, 800MB or bytes)")
    q.add_argument("--plot", default=None, metavar="PNG", help="with --budget/--memory: write the per-layer plan as a PNG plot")
    add_output_args(q)
    q.set_defaults(func=cmd_quantize)

    c = sub.add_parser("calibrate", help="calibrate without quantizing: write the statistics file DQConfig(stats=...) reads")
    _add_calibration_args(c)
    c.add_argument("--stats-out", required=True, help="statistics file to write (.safetensors)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --stats-out file")
    add_output_args(c)
    c.set_defaults(func=cmd_calibrate)

    g = sub.add_parser("generate", help="generate one image")
    _add_model_args(g, "hub id, diffusers folder or dq-quantized folder")
    g.add_argument("--prompt", required=True)
    g.add_argument("--seed", type=seed_int, default=0)
    g.add_argument("--steps", type=positive_int, default=None)
    g.add_argument("--guidance-scale", type=guidance_float, default=None)
    g.add_argument("--out", required=True, help="image file (.png)")
    add_text_encoder_arg(g)
    add_output_args(g)
    g.set_defaults(func=cmd_generate)

    r = sub.add_parser("recipes", help="list the preset recipes")
    r.set_defaults(func=cmd_recipes)

    d = sub.add_parser("doctor", help="this machine's kernel table: each path's time per layer shape and the choice")
    d.add_argument("--widths", default="128,512,1152", help="comma-separated layer widths (square linear layers)")
    d.add_argument("--rows", type=int, default=256, help="rows (tokens x batch) per call")
    d.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    d.add_argument("--attention-tokens", default="256,1024",
                   help="comma-separated token counts of the attention-core rows (float32 against bfloat16 SDPA) and of the "
                   "feed-forward tanh GELU rows (torch's kernel against x * sigmoid(2u), width 4608); '' for none")
    d.add_argument("--json", default=None, help="also write the table as JSON to this file")
    d.add_argument("--fresh", action="store_true", help="forget this machine's cached choices and measure again")
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
    """Run the ``dq`` command line; returns the exit status: 0, 2 for bad input (one line on
    stderr saying what to change), 130 when interrupted."""
    from .logs import DEFAULT, QUIET, VERBOSE, cli_output

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad option (2, the message already printed)
        return exc.code if isinstance(exc.code, int) else 2
    if getattr(args, "verbose", False) and getattr(args, "quiet", False):
        print("dq: error: --verbose and --quiet contradict each other; pass one of them", file=sys.stderr)
        return 2
    verbosity = VERBOSE if getattr(args, "verbose", False) else QUIET if getattr(args, "quiet", False) else DEFAULT
    if os.environ.get("RANK", "0") != "0" and verbosity == DEFAULT:
        verbosity = QUIET  # under `accelerate launch`, the main process speaks for all
    try:
        with cli_output(verbosity):
            return int(args.func(args) or 0)
    except (DQError, CalibrationError) as exc:
        from .calibrate.distributed import leave

        print(f"dq: error: {one_line(exc)}", file=sys.stderr)
        return leave(2)  # after a lost peer: exit now, before a process-group teardown can abort
    except KeyboardInterrupt:
        print("dq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
