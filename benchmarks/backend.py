"""Memory footprint through the diffusers backend: a PixArt-Sigma-size transformer (hidden 1152,
28 blocks, T5 captions) quantized at load with `quantization_config=dq.DQConfig(...)`, against
the same model loaded unquantized in the same dtype.

`get_memory_footprint()` counts parameters and buffers (dq's codes, scales and zero points are
buffers) and, on a dq model, the weight copies its kernels keep at run time; it is read right
after loading and again after one denoiser call (when those copies exist). Random weights: the
bytes do not depend on them. Usage:

    python benchmarks/backend.py                    # bf16 and fp32, 28 blocks
    python benchmarks/backend.py --blocks 2 --dtypes float32   # quick
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dq  # noqa: E402 - registers the backend
from dq.kernels.choice import machine  # noqa: E402

RESULTS = Path(__file__).parent / "results"
RECIPES = {
    "int8 weight-only (per channel)": {"base": "w4a16", "weight": {"bits": 8, "granularity": "channel"}},
    "w8a8-dynamic, no smoothing (int8 kernels)": {"base": "w8a8-dynamic", "smooth": None},
    # w4a16's storage with min/max group ranges: the same bytes as the preset, whose MSE clip search
    # takes minutes per block on 2 cores
    "int4 weight-only (group 64, two-level scales)": {"base": "w4a16", "weight": {"bits": 4, "granularity": "group", "group_size": 64}},
}
logger = logging.getLogger("benchmarks.backend")


def build(folder: Path, blocks: int, dtype: torch.dtype) -> None:
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=blocks,
        cross_attention_dim=1152, caption_channels=4096, sample_size=128, patch_size=2,
        norm_type="ada_norm_single", use_additional_conditions=False,
    ).to(dtype)
    model.save_pretrained(folder)


def call(model, dtype: torch.dtype) -> float:
    """One denoiser call (CFG batch 2, 256 image tokens, 300 text tokens); seconds."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 32, 32, generator=g).to(dtype)
    text = torch.randn(2, 300, 4096, generator=g).to(dtype)
    start = time.perf_counter()
    with torch.no_grad():
        out = model(hidden_states=latents, encoder_hidden_states=text, timestep=torch.tensor([500, 500]), return_dict=False)[0]
    seconds = time.perf_counter() - start
    if not torch.isfinite(out).all():
        raise SystemExit("non-finite output")
    return seconds


def measure(folder: Path, dtype: torch.dtype, save) -> dict:
    from diffusers import PixArtTransformer2DModel

    full = PixArtTransformer2DModel.from_pretrained(folder, torch_dtype=dtype)
    params = full.num_parameters()
    full_bytes = full.get_memory_footprint()
    full_seconds = call(full, dtype)
    del full
    gc.collect()
    out = {"unquantized": {"bytes": full_bytes, "num_parameters": params, "call_s": full_seconds}}
    save(out)
    for label, recipe in RECIPES.items():
        start = time.perf_counter()
        model = PixArtTransformer2DModel.from_pretrained(folder, torch_dtype=dtype, quantization_config=dq.DQConfig(recipe=recipe))
        load_s = time.perf_counter() - start
        loaded = model.get_memory_footprint()
        first = call(model, dtype)  # kernel paths chosen (measured) here; runtime copies made
        second = call(model, dtype)
        after = model.get_memory_footprint()
        row = {
            "recipe": recipe, "load_and_quantize_s": load_s, "bytes_after_load": loaded, "bytes_after_call": after,
            "ratio_after_load": full_bytes / loaded, "ratio_after_call": full_bytes / after,
            "num_parameters": model.num_parameters(), "first_call_s": first, "call_s": second,
            "quantized_layers": sum(1 for m in model.modules() if isinstance(m, dq.nn.QuantModule)),
            "kept_layers": len(model.hf_quantizer.modules_to_not_convert),
        }
        if row["num_parameters"] != params:
            raise SystemExit(f"num_parameters {row['num_parameters']} != unquantized {params}")
        out[label] = row
        save(out)  # what is measured so far is kept if a later step fails
        logger.info("%s %s: %s", dtype, label, row)
        del model
        gc.collect()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=28)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    result = {"date": dt.date.today().isoformat(), "machine": machine(), "blocks": args.blocks, "dtypes": {}}
    cpu = str(result["machine"]["cpu"]).lower().replace(" ", "-").replace("(r)", "").replace("@", "")
    path = args.out or RESULTS / f"backend-footprint-{result['date']}-{args.blocks}blocks-{cpu}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.dtypes.split(","):
            dtype = getattr(torch, name)
            folder = Path(tmp) / name
            build(folder, args.blocks, dtype)
            gc.collect()

            def save(rows, name=name):
                result["dtypes"][name] = rows
                path.write_text(json.dumps(result, indent=2))

            measure(folder, dtype, save)
    print(f"wrote {path}\n")
    print("| dtype | recipe | unquantized MB | dq MB after load | x smaller | dq MB after a call | x smaller |")
    print("|---|---|---|---|---|---|---|")
    for name, rows in result["dtypes"].items():
        full = rows["unquantized"]["bytes"] / 1e6
        for label, row in rows.items():
            if label != "unquantized":
                print(f"| {name} | {label} | {full:.1f} | {row['bytes_after_load'] / 1e6:.1f} | {row['ratio_after_load']:.2f} | "
                      f"{row['bytes_after_call'] / 1e6:.1f} | {row['ratio_after_call']:.2f} |")


if __name__ == "__main__":
    main()
