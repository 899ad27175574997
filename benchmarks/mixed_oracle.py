"""Upper-bound (oracle) search for mixed precision on the embedded default pipeline.

How good can a per-layer int4 / int8 / float plan under an average weight-bits budget get on
this model, with everything else as in benchmarks/mixed.py (base recipe w4a8: smoothing, GPTQ,
static int8 activations)? Instead of dq's cheap proxy (the denoiser-output error on a few
recorded calls, added up over layers), every candidate plan here is scored END TO END: images
generated with the plan installed (`dq.mixed.install_allocation` from layers built once per
format: no calibration per candidate), PSNR against the full-precision images of the same
seeds, on a small SEARCH prompt set. The final plans are scored on a DISJOINT held-out set (the
benchmark's evaluation prompts, calib/shapes_eval.txt[:16], seeds 0..15), beside uniform
w4a8, uniform int8 weights and dq's own allocation from the same built layers.

The search (per budget, local search in plan space, all moves scored on images):
1. Round one, shared by the budgets: every layer at int4 (the centre); for each layer and
   each other option (int8, float) that some plan under the largest budget can hold, the
   search-set image error with that layer alone raised (leave-one-in, as dq's in-context
   sensitivity, but measured on images).
2. Per budget: the exact knapsack (`dq.mixed.solve_allocation`) on those image errors (assumed
   additive, as dq assumes), and dq's own plan, both scored; the best is the centre.
3. Rounds around the centre while time allows: every layer's every other feasible option,
   one at a time, scored; then the knapsack on these in-context numbers, the best single
   moves under the budget and the `--swaps` best predicted two-layer swaps (lower one, raise
   another) are scored, and the best plan found becomes the next centre. Stops when a round
   finds nothing better (a local optimum against single moves, swaps and the re-solved
   knapsack) or the time limit is reached.

It is a search, not an exhaustive enumeration: the best plan found is a lower bound on the
best plan there is. The rank correlation between dq's proxy and the image error (around the
all-int4 centre) says whether the proxy is what misleads dq's allocation.

    python benchmarks/mixed_oracle.py --threads 1                   # 8 search prompts, 16 held out
    python benchmarks/mixed_oracle.py --search-prompts 2 --eval-prompts 2 --steps 2 --time-limit 60  # smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import time

import torch
from report import RESULTS, machine

import dq
from dq.engine import find_denoiser
from dq.eval import generate_images
from dq.eval.metrics import psnr, ssim
from dq.mixed import (
    Budget,
    allocate,
    infeasible,
    install_allocation,
    layer_report,
    measure_sensitivity,
    solve_allocation,
    spearman,
)
from dq.prompts import load_prompts

SEARCH_SEED = 10_000  # search images: seeds 10000+i (held-out: the benchmark's 0..15)


class Evaluator:
    """Scores allocations end to end: a fresh copy of the float denoiser per candidate, the
    plan installed from the built layers, images generated and compared with the float ones."""

    def __init__(self, sens, base: dq.Recipe, steps: int, batch_size: int, log_path: str | None):
        self.sens, self.base, self.steps, self.batch_size = sens, base, steps, batch_size
        self.pipe = dq.open_pipeline(None)
        self.attr, model = find_denoiser(self.pipe)
        self.template = copy.deepcopy(model)  # the float denoiser
        self.sets: dict[str, tuple[list[str], list[int], list]] = {}
        self.cache: dict[tuple, dict] = {}
        self.evals = {}  # set -> count
        self.seconds = {}
        self.log_path = log_path
        self.weights = sum(s.weights for s in sens.layers) + sens.fixed_weights
        self.bytes = {s.name: {o.format: o.bytes for o in s.options} for s in sens.layers}

    def _generate(self, prompts, seeds):
        return generate_images(self.pipe, prompts, seeds, batch_size=self.batch_size,
                               num_inference_steps=self.steps, progress=False)

    def add_set(self, name: str, prompts: list[str], seeds: list[int]) -> float:
        setattr(self.pipe, self.attr, copy.deepcopy(self.template))
        t = time.perf_counter()
        self.sets[name] = (prompts, seeds, self._generate(prompts, seeds))
        return time.perf_counter() - t

    def bits(self, allocation: dict[str, str]) -> float:
        return 8 * (sum(self.bytes[n][f] for n, f in allocation.items()) + self.sens.fixed_bytes) / self.weights

    def cost(self, allocation: dict[str, str]) -> int:
        return sum(8 * self.bytes[n][f] for n, f in allocation.items())

    def install(self, allocation: dict[str, str]):
        setattr(self.pipe, self.attr, copy.deepcopy(self.template))
        install_allocation(self.pipe, self.sens, dq.Recipe.from_dict({**self.base.to_dict(), "allocation": allocation}))
        return find_denoiser(self.pipe)[1]

    def score(self, allocation: dict[str, str], on: str, tag: str = "") -> dict:
        key = (on, tuple(sorted(allocation.items())))
        if key in self.cache:
            return self.cache[key]
        prompts, seeds, reference = self.sets[on]
        t = time.perf_counter()
        self.install(allocation)
        images = self._generate(prompts, seeds)
        per = psnr(images, reference, reduction="none")
        row = {"psnr": float(per.mean()), "ssim": float(ssim(images, reference)),
               "mse": float((10 ** (-per / 10)).mean()), "bits": self.bits(allocation)}
        dt = time.perf_counter() - t
        self.evals[on] = self.evals.get(on, 0) + 1
        self.seconds[on] = self.seconds.get(on, 0.0) + dt
        self.cache[key] = row
        if self.log_path:  # a killed run keeps what it measured
            with open(self.log_path, "a") as f:
                f.write(json.dumps({"set": on, "tag": tag, **row, "s": dt}) + "\n")
        return row


def counts(allocation: dict[str, str]) -> dict[str, int]:
    return {f: sum(v == f for v in allocation.values()) for f in ("int4", "int8", "float")}


def changes(a: dict[str, str], b: dict[str, str]) -> dict[str, str]:
    return {n: f"{a[n]}->{b[n]}" for n in a if a[n] != b[n]}


def measure_round(ev: Evaluator, centre: dict[str, str], skip, on: str, deadline: float, tag: str,
                  priority: dict[str, float] | None = None):
    """Leave-one-in on images around `centre`: {layer: {format: score row}} (None: not measured,
    as infeasible or past the deadline), the centre's score, and complete=False if cut short.
    Layers are measured in decreasing `priority` (the ones that matter first, if cut short)."""
    base = ev.score(centre, on, tag=f"{tag} centre")
    table, complete = {s.name: {} for s in ev.sens.layers}, True
    for s in sorted(ev.sens.layers, key=lambda s: -(priority or {}).get(s.name, 0.0)):
        for o in s.options:
            if o.format == centre[s.name]:
                table[s.name][o.format] = base
            elif skip(s.name, o):
                table[s.name][o.format] = None  # no plan under the budget can hold it
            elif time.perf_counter() > deadline:
                table[s.name][o.format], complete = None, False
            else:
                table[s.name][o.format] = ev.score({**centre, s.name: o.format}, on, tag=f"{tag} {s.name}={o.format}")
    return table, base, complete


def damage_of(row: dict | None, key: str) -> float:
    """What the knapsack minimizes: the image MSE, or minus the mean PSNR (additive in dB)."""
    if row is None:
        return math.inf
    return row["mse"] if key == "mse" else -row["psnr"]


def knapsack(ev: Evaluator, table: dict, capacity: int, key: str) -> dict[str, str]:
    names = [s.name for s in ev.sens.layers]
    fmts = [[o.format for o in s.options] for s in ev.sens.layers]
    damage = [[damage_of(table[n][f], key) for f in fs] for n, fs in zip(names, fmts)]
    cost = [[8 * ev.bytes[n][f] for f in fs] for n, fs in zip(names, fmts)]
    picks = solve_allocation(damage, cost, capacity)
    return {n: fs[j] for n, fs, j in zip(names, fmts, picks)}


def predicted_psnr(table: dict, centre: dict, base: dict, plan: dict) -> float:
    """Additive prediction (in dB) of `plan`'s mean PSNR from single moves around `centre`."""
    return base["psnr"] + sum(table[n][f]["psnr"] - base["psnr"] for n, f in plan.items()
                              if f != centre[n] and table[n][f] is not None)


def search_budget(ev: Evaluator, budget: Budget, starts: dict[str, dict], round_one: tuple, on: str,
                  deadline: float, swaps: int, max_rounds: int) -> dict:
    """Local search for one budget (see the module docstring); returns the trace and the best plan."""
    capacity = budget.capacity(ev.sens)
    skip = infeasible(ev.sens, budget)
    trace = []
    table1, base1 = round_one
    low = {s.name: ev.sens.low for s in ev.sens.layers}
    best_name, best = None, None
    candidates = dict(starts)
    for key in ("psnr", "mse"):
        candidates[f"knapsack ({key}) on round one"] = knapsack(ev, table1, capacity, key)
    for label, plan in candidates.items():
        if ev.cost(plan) > capacity:
            continue
        r = ev.score(plan, on, tag=f"{budget.value:g} start {label}")
        trace.append({"round": 0, "what": label, **r, "predicted_psnr": predicted_psnr(table1, low, base1, plan),
                      "counts": counts(plan)})
        print(f"[{budget.value:g}] start {label}: {json.dumps(trace[-1])}", flush=True)
        if best is None or r["psnr"] > best[1]["psnr"]:
            best_name, best = label, (plan, r)
    rounds = []
    for k in range(1, max_rounds + 1):
        if time.perf_counter() > deadline:
            break
        centre, centre_score = best
        t = time.perf_counter()
        # the layers whose moves mattered most in round one first
        priority = {n: max((abs(r["psnr"] - base1["psnr"]) for r in row.values() if r is not None), default=0.0)
                    for n, row in table1.items()}
        table, base, complete = measure_round(ev, centre, skip, on, deadline, tag=f"{budget.value:g} round {k}",
                                              priority=priority)
        proposals = []  # the knapsack on what was measured (unmeasured moves are never chosen)
        proposals += [(f"knapsack ({key})", knapsack(ev, table, capacity, key)) for key in ("psnr", "mse")]
        # measured single moves that fit and improve (scored already: from the cache)
        for n, row in table.items():
            for f, r in row.items():
                plan = {**centre, n: f}
                if f != centre[n] and r is not None and ev.cost(plan) <= capacity and r["psnr"] > base["psnr"]:
                    proposals.append((f"single {n}={f}", plan))
        # two-layer swaps under the budget, ranked by the additive prediction
        pairs = []
        used = ev.cost(centre)
        moves = [(n, f, r) for n, row in table.items() for f, r in row.items() if r is not None and f != centre[n]]
        for i, (a, fa, ra) in enumerate(moves):
            for b, fb, rb in moves[i + 1:]:
                if b == a:
                    continue
                delta = 8 * (ev.bytes[a][fa] - ev.bytes[a][centre[a]] + ev.bytes[b][fb] - ev.bytes[b][centre[b]])
                gain = ra["psnr"] + rb["psnr"] - 2 * base["psnr"]
                if used + delta <= capacity and gain > 0:
                    pairs.append((-gain, a, fa, b, fb))
        pairs.sort()
        proposals += [(f"swap {a}={fa} {b}={fb}", {**centre, a: fa, b: fb}) for _, a, fa, b, fb in pairs[:swaps]]
        improved = False
        tried = []
        for label, plan in proposals:
            if time.perf_counter() > deadline and not label.startswith("knapsack"):
                break
            r = ev.score(plan, on, tag=f"{budget.value:g} round {k} {label}")
            tried.append({"what": label, **r, "predicted_psnr": predicted_psnr(table, centre, base, plan),
                          "changes": len(changes(centre, plan))})
            if r["psnr"] > best[1]["psnr"]:
                best_name, best, improved = f"round {k} {label}", (plan, r), True
        info = {"round": k, "centre_psnr": centre_score["psnr"], "complete": complete, "wall": time.perf_counter() - t,
                "moves_measured": len(moves), "proposals": tried, "best": best_name, "best_psnr": best[1]["psnr"],
                "changes_from_centre": changes(centre, best[0]),
                "moves": {f"{n}={f}": r["psnr"] - base["psnr"] for n, f, r in moves}}
        rounds.append(info)
        print(f"[{budget.value:g}] round {k}: centre {centre_score['psnr']:.3f} dB -> best {best[1]['psnr']:.3f} dB "
              f"({best_name}); {len(moves)} moves, {len(tried)} proposals, {info['wall']:.0f} s", flush=True)
        if not improved:
            break
    return {"budget": budget.value, "capacity_bits": capacity, "starts": trace, "rounds": rounds, "best_from": best_name,
            "best": best[0], "best_search": best[1],
            "knapsack_round_one": candidates["knapsack (psnr) on round one"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--search-prompts", type=int, default=8, help="search set: the LAST n prompts of shapes_eval")
    parser.add_argument("--eval-prompts", type=int, default=16, help="held-out set: the first n prompts of shapes_eval")
    parser.add_argument("--calib-prompts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--budgets", default="5,uniform", help="average weight bits; 'uniform': uniform w4a8's own")
    parser.add_argument("--time-limit", type=float, default=2400, help="seconds for the search (all budgets)")
    parser.add_argument("--swaps", type=int, default=8, help="predicted two-layer swaps scored per round")
    parser.add_argument("--max-rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / f"mixed-oracle-{time.strftime('%Y-%m-%d')}-amd-epyc.json"))
    parser.add_argument("--render", default=None, metavar="JSON", help="only print the summary of an earlier run")
    args = parser.parse_args()
    if args.render:
        with open(args.render) as f:
            print(summary(json.load(f)))
        return
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    start_all = time.perf_counter()
    load_start = os.getloadavg()

    eval_all = load_prompts("shapes_eval")
    held = eval_all[: args.eval_prompts]
    search = eval_all[len(eval_all) - args.search_prompts:]
    if set(held) & set(search) or args.eval_prompts + args.search_prompts > len(eval_all):
        raise SystemExit("search and held-out prompts overlap")
    calib = load_prompts("shapes_calib")[: args.calib_prompts]

    # dq's own allocation from the same built layers: the benchmark's default (in context,
    # 2 rounds, the second around the 5-bit plan, the recipe's recording size)
    base = dq.Recipe.from_dict({"base": "w4a8", "budget": 5.0, "mixed": {"sensitivity": "measure", "measure": "in-context", "rounds": 2}})
    pipe = dq.open_pipeline(None)
    _, model = find_denoiser(pipe)
    t, c = time.perf_counter(), time.process_time()
    sens = measure_sensitivity(pipe, model, base, calib, args.steps, {}, keep_built=True)
    sens_wall, sens_cpu = time.perf_counter() - t, time.process_time() - c
    print(f"built and measured (dq) in {sens_wall:.0f} s wall, {sens_cpu:.0f} s CPU: {json.dumps(sens.seconds)}", flush=True)

    log = args.out + ".partial"
    if os.path.exists(log):
        os.remove(log)
    ev = Evaluator(sens, base, args.steps, args.batch_size, log)
    ref_s = {"search": ev.add_set("search", search, [SEARCH_SEED + i for i in range(len(search))]),
             "held": ev.add_set("held", held, list(range(len(held))))}
    names = [s.name for s in sens.layers]
    from dq.engine import plan_layers

    planned = {ch.name for ch in plan_layers(find_denoiser(dq.open_pipeline(None))[1], dq.Recipe.from_any("w4a8"))}
    uniform = {f: {n: (f if n in planned else "float") for n in names} for f in ("int4", "int8")}
    rows = layer_report(ev.install(uniform["int4"]))  # the benchmark's average bits of uniform w4a8
    w4_bits = 8 * sum(r["bytes"] for r in rows) / sum(r["weights"] for r in rows)
    budgets = [round(w4_bits, 3) if b.strip() == "uniform" else float(b) for b in args.budgets.split(",") if b.strip()]

    t = time.perf_counter()
    one_eval = ev.score(uniform["int4"], "search", tag="uniform int4")
    per_eval = time.perf_counter() - t
    print(f"one search candidate: {per_eval:.1f} s (reference images: {json.dumps(ref_s)})", flush=True)

    deadline_all = time.perf_counter() + args.time_limit
    low = {n: sens.low for n in names}
    widest = Budget("bits", max(budgets))
    t = time.perf_counter()
    table1, base1, complete1 = measure_round(ev, low, infeasible(sens, widest), "search", deadline_all, tag="round one")
    round_one_s = time.perf_counter() - t
    print(f"round one (image error, all-int4 centre {base1['psnr']:.3f} dB): {round_one_s:.0f} s, complete {complete1}",
          flush=True)

    # dq's proxy around the same centre (its first round) against the image error
    proxy = sens.round_one or {s.name: {o.format: o.measured for o in s.options} for s in sens.layers}
    pairs = [(proxy[n][f], table1[n][f]["mse"]) for n in names for f in table1[n]
             if f != low[n] and proxy[n].get(f) is not None and table1[n][f] is not None]
    rho = spearman([p[0] for p in pairs], [p[1] for p in pairs]) if len(pairs) > 2 else None
    print(f"dq proxy vs image error around all-int4: Spearman {rho} over {len(pairs)} moves", flush=True)

    results = []
    remaining = [b for b in budgets]
    for i, b in enumerate(remaining):
        budget = Budget("bits", b)
        dq_plan = allocate(sens, budget)
        # the rest of the time split evenly over the budgets still to search
        deadline = time.perf_counter() + max(0.0, deadline_all - time.perf_counter()) / (len(remaining) - i)
        res = search_budget(ev, budget, {"dq allocation": dq_plan}, (table1, base1), "search", deadline,
                            args.swaps, args.max_rounds)
        res["dq_plan"] = dq_plan
        results.append(res)

    # held out: uniform baselines, dq's plans, the oracle's
    held_rows = {"uniform w4a8": ev.score(uniform["int4"], "held"), "uniform int8": ev.score(uniform["int8"], "held")}
    search_rows = {"uniform w4a8": one_eval, "uniform int8": ev.score(uniform["int8"], "search")}
    lo, hi = held_rows["uniform w4a8"], held_rows["uniform int8"]
    slo, shi = search_rows["uniform w4a8"], search_rows["uniform int8"]

    def frac(row, a, z, metric):
        gap = z[metric] - a[metric]
        return (row[metric] - a[metric]) / gap if gap else float("nan")

    for res in results:
        b = res["budget"]
        for label, plan in (("dq", res["dq_plan"]), ("knapsack on image round one", res["knapsack_round_one"]),
                            ("oracle", res["best"])):
            h = ev.score(plan, "held", tag=f"held {b:g} {label}")
            s = ev.score(plan, "search", tag=f"search {b:g} {label}")
            res.setdefault("held", {})[label] = {**h, "counts": counts(plan), "psnr_recovered": frac(h, lo, hi, "psnr"),
                                                 "ssim_recovered": frac(h, lo, hi, "ssim")}
            res.setdefault("search", {})[label] = {**s, "psnr_recovered": frac(s, slo, shi, "psnr"),
                                                   "ssim_recovered": frac(s, slo, shi, "ssim")}
            print(f"[{b:g}] {label}: held {h['psnr']:.2f} dB / {h['ssim']:.4f} "
                  f"({100 * frac(h, lo, hi, 'psnr'):.0f} % / {100 * frac(h, lo, hi, 'ssim'):.0f} % of the gap); "
                  f"search {s['psnr']:.2f} dB ({100 * frac(s, slo, shi, 'psnr'):.0f} %)", flush=True)
    result = {
        "machine": machine(), "threads": args.threads, "load_start": load_start, "load_end": os.getloadavg(),
        "steps": args.steps, "calib_prompts": len(calib), "search_prompts": search, "search_seeds": f"{SEARCH_SEED}+i",
        "held_prompts": f"shapes_eval[:{len(held)}], seeds 0..{len(held) - 1}",
        "budgets": budgets, "uniform_w4a8_bits": w4_bits,
        "sensitivity": {"wall": sens_wall, "cpu": sens_cpu, "phases": sens.seconds, "centre": sens.centre},
        "seconds_per_search_candidate": per_eval, "evaluations": ev.evals, "evaluation_seconds": ev.seconds,
        "round_one": {"table": {n: {f: r and r["psnr"] for f, r in row.items()} for n, row in table1.items()},
                      "dq_proxy": proxy, "centre": base1, "wall": round_one_s, "complete": complete1,
                      "spearman_dq_proxy_vs_image_mse": rho, "pairs": len(pairs)},
        "held_baselines": held_rows, "search_baselines": search_rows,
        "results": results, "total_s": time.perf_counter() - start_all,
    }
    RESULTS.mkdir(exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(summary(result))
    print(f"wrote {args.out} ({result['total_s'] / 60:.1f} min)")


def summary(result: dict) -> str:
    """The numbers of a run, as lines for BENCHMARKS.md's notes."""
    hb, sb = result["held_baselines"], result["search_baselines"]
    r1 = result["round_one"]
    lines = [
        f"machine: {result['machine']['cpu']} ({result['machine'].get('family_model_stepping')}), "
        f"{result['machine']['cores']} cores, {result['threads']} thread(s), {result['machine']['date']}; "
        f"load {'/'.join(f'{v:.1f}' for v in result['load_start'])} -> {'/'.join(f'{v:.1f}' for v in result['load_end'])}",
        f"search: {len(result['search_prompts'])} prompts (shapes_eval, last), seeds {result['search_seeds']}; held out: "
        f"{result['held_prompts']}; {result['steps']} steps; {result['calib_prompts']} calibration prompts",
        f"one search candidate {result['seconds_per_search_candidate']:.1f} s; evaluations {json.dumps(result['evaluations'])}; "
        f"total {result['total_s'] / 60:.1f} min",
        f"held out: uniform w4a8 {hb['uniform w4a8']['psnr']:.2f} dB / {hb['uniform w4a8']['ssim']:.4f}, uniform int8 "
        f"{hb['uniform int8']['psnr']:.2f} dB / {hb['uniform int8']['ssim']:.4f}; search: uniform w4a8 "
        f"{sb['uniform w4a8']['psnr']:.2f} dB, uniform int8 {sb['uniform int8']['psnr']:.2f} dB",
        f"round one (all int4, {r1['centre']['psnr']:.2f} dB on search): {r1['pairs']} moves, dq proxy vs image MSE "
        f"Spearman {r1['spearman_dq_proxy_vs_image_mse']:.3f}, {r1['wall']:.0f} s",
    ]
    for res in result["results"]:
        rounds = res["rounds"]
        lines.append(f"budget {res['budget']:g}: best from {res['best_from']}; rounds {len(rounds)} "
                     + "; ".join(f"round {r['round']}: centre {r['centre_psnr']:.2f} -> {r['best_psnr']:.2f} dB, "
                                 f"{r['moves_measured']} moves, complete {r['complete']}, {r['wall']:.0f} s" for r in rounds))
        for label in ("dq", "knapsack on image round one", "oracle"):
            h, s = res["held"][label], res["search"][label]
            lines.append(
                f"  {label}: {h['bits']:.3f} bits, {json.dumps(h['counts'])}; held {h['psnr']:.2f} dB / {h['ssim']:.4f} = "
                f"{100 * h['psnr_recovered']:.0f} % / {100 * h['ssim_recovered']:.0f} % of the gaps; search "
                f"{s['psnr']:.2f} dB / {s['ssim']:.4f} = {100 * s['psnr_recovered']:.0f} % / {100 * s['ssim_recovered']:.0f} %")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
