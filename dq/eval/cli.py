"""``dq eval``: generate images with a pipeline and score them (FID, CLIP, attributes, LPIPS,
PSNR, SSIM), writing JSON and printing a table."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import EvalError
from .evaluate import METRICS, Scorer, evaluate, parse_metrics
from .fid import FID_FEATURES

logger = logging.getLogger(__name__)

DEFAULT_NUM_PROMPTS = 64


def add_eval_parser(subparsers) -> None:
    """Add the ``eval`` sub-command to an argparse sub-parser set."""
    from dq.cli import add_output_args, add_text_encoder_arg, positive_int, seed_int
    parser = subparsers.add_parser(
        "eval",
        help="generate images and score them (FID, CLIP score, attribute accuracy, LPIPS, PSNR, SSIM)",
        description=__doc__,
    )
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        metavar="MODEL_OR_DIR",
        help="pipeline to evaluate: a dq folder, a diffusers folder or hub id (default: the embedded pipeline)",
    )
    parser.add_argument(
        "--reference",
        metavar="MODEL",
        help="full-precision pipeline whose images (same prompts and seeds) are the target of LPIPS/PSNR/SSIM/FID",
    )
    parser.add_argument(
        "--prompts",
        metavar="FILE",
        help="prompt file, one per line ('#' comments), or a shipped set name (default: captions of the default grammar)",
    )
    parser.add_argument(
        "--num-prompts",
        type=positive_int,
        default=None,
        metavar="N",
        help=f"use the first N prompts (default: all of --prompts, or the first {DEFAULT_NUM_PROMPTS} of calib/shapes_eval.txt)",
    )
    parser.add_argument(
        "--metrics",
        default=None,
        metavar="LIST",
        help=f"comma-separated subset of {','.join(METRICS)} (default: every metric the inputs and weights allow)",
    )
    parser.add_argument(
        "--json", dest="json_out", metavar="OUT", help="write the results as JSON here"
    )
    parser.add_argument(
        "--steps", type=positive_int, default=None, help="inference steps (default: the pipeline's)"
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=4,
        help="images per pipeline call (does not change the images)",
    )
    parser.add_argument(
        "--seed", type=seed_int, default=0, help="prompt i is generated with seed SEED+i"
    )
    parser.add_argument(
        "--real-images",
        metavar="DIR",
        help="folder of real images: FID's target instead of the reference",
    )
    parser.add_argument(
        "--fid-features",
        choices=FID_FEATURES,
        default="inception",
        help="FID feature network: Inception-v3 (standard; needs its weights) or CLIP image features (offline)",
    )
    parser.add_argument(
        "--inception-weights",
        metavar="PATH",
        help="local FID Inception weights (weights-inception-2015-12-05-6726825d.pth) for offline use",
    )
    parser.add_argument(
        "--lpips-weights",
        metavar="PATH",
        help="local torchvision AlexNet checkpoint (alexnet-owt-7be5be79.pth) for LPIPS offline",
    )
    parser.add_argument(
        "--clip-model",
        metavar="NAME",
        help="open_clip model for the CLIP score (default: dq's offline evaluator CLIP)",
    )
    parser.add_argument(
        "--clip-pretrained",
        metavar="TAG",
        help="open_clip pretrained tag or local checkpoint file for --clip-model",
    )
    parser.add_argument(
        "--device", default=None, help="device for the pipelines (default: as loaded; checked to exist)"
    )
    add_text_encoder_arg(parser)  # the evaluated pipeline's; the reference stays as loaded
    add_output_args(parser)


def run_eval(args: argparse.Namespace) -> int:
    """Run ``dq eval``; raises ``EvalError`` (a ``DQError``) with a message on bad input.
    Every option is checked before a pipeline is opened."""
    from dq.cli import (
        check_device,
        check_model,
        check_text_encoders,
        check_writable,
        open_model,
        quantize_text_encoders_of,
    )
    from dq.logs import quiet_third_party, show_progress
    from dq.provenance import open_reference

    if args.json_out:
        check_writable(args.json_out, "--json", folder=False)
    metrics = parse_metrics(args.metrics)
    prompts = _prompts(args.prompts, args.num_prompts)
    for path, option in (
        (args.inception_weights, "--inception-weights"),
        (args.lpips_weights, "--lpips-weights"),
    ):
        if path is not None and not Path(path).is_file():
            raise EvalError(f"{option} {path}: no such file")
    if args.real_images is not None and not Path(args.real_images).is_dir():
        raise EvalError(f"--real-images {args.real_images}: no such folder")
    scorer = Scorer(
        metrics,
        fid_features=args.fid_features,
        inception_weights=args.inception_weights,
        lpips_weights=args.lpips_weights,
        clip_model=args.clip_model,
        clip_pretrained=args.clip_pretrained,
    )
    check_model(args.model, "MODEL_OR_DIR")
    if args.reference:
        check_model(args.reference, "--reference")
    check_device(args.device)
    text_recipe = check_text_encoders(args.text_encoders)
    from dq.calibrate import distributed

    device = distributed.join(args.device)  # under `accelerate launch`: this process's device
    distributed.check_agreement({"command line": lambda: sys.argv[1:], "prompts": lambda: prompts})
    if distributed.world_size() > 1 and distributed.is_main():
        logger.info("evaluating on %d processes (%d prompts each or fewer)", distributed.world_size(),
                    len(distributed.shard(len(prompts))))
    pipe = open_model(args.model, device=device)
    quantize_text_encoders_of(pipe, text_recipe)
    reference = None
    if args.reference or _compares_with_source(pipe, metrics, args.real_images):
        reference = open_reference(
            pipe, args.reference, opener=lambda name: open_model(name, option="--reference", device=device)
        )
    for p in (pipe, reference):
        if p is not None and not show_progress():
            p.set_progress_bar_config(disable=True)
    with quiet_third_party():
        result = evaluate(
            pipe,
            prompts,
            reference=reference,
            real_images=args.real_images,
            seed=args.seed,
            batch_size=args.batch_size,
            num_inference_steps=args.steps,
            scorer=scorer,
        )
    result.settings.update(
        model=args.model or "default", reference=args.reference, prompts=args.prompts or "shapes_eval"
    )
    if distributed.is_main():  # every process holds the merged result; one writes it
        if args.json_out:
            out = Path(args.json_out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(
                json.dumps(result.to_dict(per_image=True), indent=2) + "\n", encoding="utf-8"
            )
            logger.info("wrote %s", out)
        sys.stdout.write(result.to_table() + "\n")
    distributed.barrier("writing the evaluation results")
    return 0


def _compares_with_source(pipe, metrics, real_images) -> bool:
    """A quantized model evaluated without --reference on metrics that need one is compared
    with the full-precision model it was made from (recorded in its folder)."""
    from dq.engine import find_denoiser
    from dq.provenance import source_of

    needs = {"lpips", "psnr", "ssim"} | (set() if real_images else {"fid"})
    return bool(metrics and needs & set(metrics)) and source_of(find_denoiser(pipe)[1]) is not None


def _prompts(source: str | None, limit: int | None) -> list[str]:
    if limit is not None and limit < 1:
        raise EvalError(f"--num-prompts must be at least 1, got {limit}")
    if source is None:
        source = "shapes_eval"  # the embedded default's evaluation set, disjoint from calibration
        limit = limit or DEFAULT_NUM_PROMPTS
    from dq.prompts import load_prompts  # raises DQError for a missing or empty file

    return load_prompts(source)[:limit]
