"""Issue 14 feasibility: would mixing precision per output row (some rows of a layer int8, the
rest int4) pay more than per layer? Per layer of the embedded pipeline's w4a8 plan, on inputs
recorded from the full-precision pipeline (2 prompts x 6 steps, every 7th row, at most 4096),
the output error E_n = mean((x (W_q - W)^T)_n^2) of each output row n with round-to-nearest
int4 (groups of 64) and int8 (per channel) weights, and the share of the int4 -> int8 gain
(E4_n - E8_n) that the top 25 % / 10 % of rows hold. Uniform one bit more (int5) removes about
75 % of the weight error; if the top quarter of rows held far more than that share of the gain,
rows would be the better unit.

    python benchmarks/mixed_rows.py
"""
import json

import torch
from report import RESULTS, machine

import dq
from dq.engine import find_denoiser, plan_layers

torch.set_num_threads(2)
torch.manual_seed(0)
pipe = dq.open_pipeline(None)
_, model = find_denoiser(pipe)
names = [c.name for c in plan_layers(model, dq.Recipe.from_any("w4a8"))]
mods = {n: model.get_submodule(n) for n in names}
mods = {n: m for n, m in mods.items() if isinstance(m, torch.nn.Linear)}
rec = {n: [] for n in mods}
hooks = [m.register_forward_pre_hook(lambda m, a, n=n: rec[n].append(a[0].detach().reshape(-1, a[0].shape[-1])[::7].clone())) for n, m in mods.items()]
with torch.no_grad():
    pipe(prompt=["a red circle above a blue square", "a green triangle left of a yellow star"], num_inference_steps=6,
         generator=torch.Generator().manual_seed(0), output_type="np")
for h in hooks:
    h.remove()


def q_group(W, bits, group):
    o, i = W.shape
    g = W.reshape(o, i // group, group)
    qmax = 2 ** (bits - 1) - 1
    s = g.abs().amax(-1, keepdim=True).clamp(min=1e-12) / qmax
    return (g / s).round().clamp(-qmax - 1, qmax).mul(s).reshape(o, i)


out = []
for n, m in mods.items():
    X = torch.cat(rec[n])[:4096]
    W = m.weight.detach().float()
    i = W.shape[1]
    W4 = q_group(W, 4, 64 if i % 64 == 0 else i)
    W8 = q_group(W, 8, i)
    E4 = ((X @ (W4 - W).t()) ** 2).mean(0)
    E8 = ((X @ (W8 - W).t()) ** 2).mean(0)
    G = (E4 - E8).clamp(min=0)
    Gs = G.sort(descending=True).values
    k = max(1, len(Gs) // 4)
    out.append({"layer": n, "rows": len(Gs), "top25_share": float(Gs[:k].sum() / Gs.sum()),
                "top10_share": float(Gs[: max(1, len(Gs) // 10)].sum() / Gs.sum()), "E4": float(E4.sum()), "E8": float(E8.sum())})
shares = torch.tensor([o["top25_share"] for o in out])
w = torch.tensor([o["E4"] for o in out])
print(f"{len(out)} layers; top-25% rows hold, of the int4->int8 gain: median {shares.median():.3f}, "
      f"min {shares.min():.3f}, max {shares.max():.3f}, error-weighted {float((shares * w).sum() / w.sum()):.3f}")
print("top-10% rows: median", f"{torch.tensor([o['top10_share'] for o in out]).median():.3f}")
RESULTS.mkdir(exist_ok=True)
with open(RESULTS / "mixed-rows.json", "w") as f:
    json.dump({"machine": machine(), "layers": out}, f, indent=1)
