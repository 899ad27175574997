"""Item 4 scan: which static layer classes of w8a8 gain from dynamic per-token ranges (64 prompts).

Run as it was on 2026-12-02, before the PixArt rule covered q/k/v and ff.net.2 (on today's
rule the base row already has them dynamic): python benchmarks/results/w8a8-dynamic-scan-64-2026-12-02.py 64
"""
import json
import logging
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))  # benchmarks/
import dq
from dq.eval import generate_images
from dq.eval.metrics import psnr, ssim
from dq.prompts import load_prompts
from dq.recipe import Recipe

logging.basicConfig(level=logging.WARNING)
torch.set_num_threads(1)
N, STEPS, CAL = int(sys.argv[1]), 10, 32
prompts = load_prompts("shapes_eval")[:N]
calib = load_prompts("shapes_calib")[:CAL]
gen = dict(batch_size=16, num_inference_steps=STEPS)
DYN = {"bits": 8, "granularity": "token", "symmetric": False, "dynamic": True}
variants = {
    "w8a8": [],
    "+ff.net.2": [r"\.ff\.net\.2$"],
    "+attn1.qkv": [r"\.attn1\.to_[qkv]$"],
    "+ff.net.0": [r"\.ff\.net\.0\.proj$"],
    "+attn2.to_q": [r"\.attn2\.to_q$"],
}
fp = dq.open_pipeline(None)
ref = generate_images(fp, prompts, **gen)
def score(images):
    return (float(psnr(images, ref)), float(ssim(images, ref)))
out = {}
for name, pats in variants.items():
    pipe = dq.open_pipeline(None)
    rec = Recipe.from_dict({"base": "w8a8", "overrides": [{"pattern": p, "activation": DYN} for p in pats]})
    t = time.time()
    dq.quantize(pipe, rec, calib_prompts=calib, num_inference_steps=STEPS)
    imgs = generate_images(pipe, prompts, **gen)
    out[name] = score(imgs)
    print(name, out[name], round(time.time() - t), flush=True)
from quality import torchao_int8_dynamic  # noqa
ao = dq.open_pipeline(None)
torchao_int8_dynamic(ao)
out["torchao"] = score(generate_images(ao, prompts, **gen))
print("torchao", out["torchao"], flush=True)
json.dump(out, open(f"scan-{N}.json", "w"), indent=1)
