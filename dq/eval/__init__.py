"""Evaluation of (quantized) pipelines: FID, CLIP score, attribute accuracy, LPIPS, PSNR, SSIM.

Needs the `eval` extra (torchmetrics, open_clip, torchvision; torch-fidelity for Inception FID).
"""

from .attributes import AttributeResult, attribute_accuracy
from .clip import ClipModel, clip_score, load_clip
from .errors import EvalError, MissingWeightsError
from .evaluate import METRICS, EvalResult, Scorer, evaluate, generate_images, parse_metrics
from .fid import FidScorer, load_image_folder
from .lpips import LpipsScorer
from .metrics import psnr, ssim, to_batch, to_pil, to_uint8

__all__ = [
    "METRICS",
    "AttributeResult",
    "ClipModel",
    "FidScorer",
    "LpipsScorer",
    "attribute_accuracy",
    "clip_score",
    "load_clip",
    "load_image_folder",
    "EvalError",
    "EvalResult",
    "MissingWeightsError",
    "Scorer",
    "evaluate",
    "generate_images",
    "parse_metrics",
    "psnr",
    "ssim",
    "to_batch",
    "to_pil",
    "to_uint8",
]
