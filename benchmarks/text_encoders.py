"""Memory saved by quantizing a T5-XXL text encoder weight-only (`dq.quantize_text_encoders`),
and what it does to the prompt embeddings.

A random-weight T5 encoder at T5-v1.1-XXL width (d_model 4096, d_ff 10240, 64 heads; the
encoder of PixArt, SD3 and FLUX) is built with `--blocks` blocks (default 2: 24 would need
19 GB in float32 to build), quantized with each weight-only recipe, and measured: stored bytes
per block and of the shared embedding, extrapolated to the full 24 blocks (every block has the
same shapes, so the extrapolation is exact for storage), and the cosine similarity of the
encoder's output to the float one's on random token ids (random weights: a stand-in, not
real-prompt quality).

    python benchmarks/text_encoders.py [--blocks 2]

Writes benchmarks/results/text-encoders-<date>-<machine>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dq.text_encoders import module_bytes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FULL_BLOCKS = 24


class _Pipe:
    """Just enough of a pipeline for `quantize_text_encoders`."""

    def __init__(self, encoder):
        self.text_encoder = encoder


def main() -> None:
    from transformers import T5Config, T5EncoderModel

    import dq
    from dq.kernels import choice

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=2)
    args = parser.parse_args()
    config = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=args.blocks, num_heads=64,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
    torch.manual_seed(0)
    base = T5EncoderModel(config).eval()
    ids = torch.randint(0, 32128, (1, 120), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = base(input_ids=ids).last_hidden_state
    embed = base.shared.weight.numel() * 4
    rows = []
    for recipe in ("float", "w8a16", "w4a16"):
        enc = copy.deepcopy(base)
        if recipe != "float":
            dq.quantize_text_encoders(_Pipe(enc), recipe)
        total = module_bytes(enc)
        per_block = (total - embed - sum(p.numel() * p.element_size() for p in enc.encoder.final_layer_norm.parameters())) / args.blocks
        with torch.no_grad():
            out = enc(input_ids=ids).last_hidden_state
        cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
        # bf16 is how T5-XXL ships; float32 here: the bf16 figure halves the float parts
        full_fp32 = embed + per_block * FULL_BLOCKS
        rows.append({"recipe": recipe, "bytes_per_block": per_block, "full_24_blocks_bytes_fp32_float_parts": full_fp32,
                     "cosine_to_float": cos})
        del enc
    m = choice.machine()
    result = {"date": dt.date.today().isoformat(), "machine": f"{m['cpu']} ({os.cpu_count()} cores)",
              "blocks_built": args.blocks, "embedding_bytes_fp32": embed, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", result["machine"].lower()).strip("-")
    path = RESULTS / f"text-encoders-{result['date']}-{slug}.json"
    path.write_text(json.dumps(result, indent=2))
    gb = 2**30
    f = rows[0]["bytes_per_block"]
    print("| T5-XXL encoder | bytes per block | 24 blocks + embedding (float parts fp32) | vs float | output cosine |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['recipe']} | {r['bytes_per_block'] / 2**20:.0f} MB | {r['full_24_blocks_bytes_fp32_float_parts'] / gb:.2f} GB | "
              f"{f / r['bytes_per_block']:.2f}x per block | {r['cosine_to_float']:.5f} |")
    print(f"written {path}")


if __name__ == "__main__":
    main()
