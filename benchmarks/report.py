"""How `benchmarks/bench.py` shows its results: the targets and their verdicts, every ratio within rounds, and
the markdown tables of OUT/bench.md (OUT/bench.json holds the same and each round's values)."""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from deepspeed.accelerator import get_accelerator

from benchmarks.measure import clocks, on_cpu
from benchmarks.variants import EXPERT_COUNTS, STEPS

TARGETS = {  # name: (metric, bound, "max" if the value must stay at or below the bound else "min")
    "TCD step / MoE MLM-only step": ("tcd_over_moe", 1.40, "max"),
    "dense tokens/s / HF baseline tokens/s": ("dense_over_hf", 1.5, "min"),
    "relation losses / TCD step": ("relation_share", 0.05, "max"),
    "MFU, dense step": ("mfu_dense", 0.50, "min"),
    "MFU, MoE step": ("mfu_moe", 0.50, "min"),
    "MFU, TCD step": ("mfu_tcd", 0.50, "min"),
    "N ranks / 1 rank tokens/s, TCD step": ("scaling_tcd", 1.8, "min"),
}


def spread(values: list[float], best: float) -> dict:
    """`best`: the same ratio of each side's best time, an estimate that ignores time lost to other processes."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "best": best,
            "rounds": values}


def ratios_on(clock: str, main: dict, scaling: list[dict]) -> dict[str, dict]:
    """Every ratio on one clock: within each round, and of the best times."""
    s, flops, peak = main["seconds"][clock], main["flops_per_step_per_rank"], main["matmul_flops"][clock]
    rounds, world = range(len(s["dense"])), main["world_size"]

    def ratio(a: str, b: str) -> tuple[list[float], float]:
        return [s[a][r] / s[b][r] for r in rounds], min(s[a]) / min(s[b])

    measured = {
        "tcd_over_moe": ratio("tcd", "moe"),
        "dense_over_hf": ratio("hf", "dense"),
        "relation_share": ratio("relations", "tcd"),
        **{f"mfu_{v}": ([flops[v] / s[v][r] / peak["square"][r] for r in rounds],
                        flops[v] / min(s[v]) / max(peak["square"])) for v in STEPS},
        "masked_head_speedup": ratio("dense_full_head", "dense"),
        "teacher_cut_speedup": ratio("teacher_full", "teacher_cut"),
        **{f"{kind}_matmul_over_peak": ([peak[kind][r] / peak["square"][r] for r in rounds],
                                        max(peak[kind]) / max(peak["square"])) for kind in ("ffn", "projection")},
    }
    pairs = list(zip(scaling[0::2], scaling[1::2]))  # launches alternate: 1 rank, then `world` ranks
    for kind in ("dense", "moe", "tcd") if pairs else ():
        # Tokens/s at a fixed per-rank batch: world * t(1 rank) / t(world ranks), per pair of adjacent launches.
        runs = {w: [t for rec in scaling if rec["world_size"] == w for t in rec["seconds"][clock][kind]]
                for w in (1, world)}
        measured[f"scaling_{kind}"] = (
            [world * statistics.median(one["seconds"][clock][kind]) / statistics.median(many["seconds"][clock][kind])
             for one, many in pairs],
            world * min(runs[1]) / min(runs[world]),
        )
    return {name: spread(*values) for name, values in measured.items()}


def summarize(main: dict, memory: dict, scaling: list[dict], args: argparse.Namespace, command: str) -> dict:
    """Verdicts on CPU time where there is one (the work a step is, whatever else the machine runs), except
    for scaling, which is about wall clock (it includes waiting on the other ranks)."""
    ratios = {clock: ratios_on(clock, main, scaling) for clock in clocks()}
    targets = []
    for name, (key, bound, kind) in TARGETS.items():
        clock = "wall" if key.startswith("scaling") or not on_cpu() else "cpu"
        value = ratios[clock][key]["median"] if key in ratios[clock] else None
        met = None if value is None else (value <= bound if kind == "max" else value >= bound)
        targets.append({"target": name, "key": key, "bound": bound, "kind": kind, "clock": clock, "value": value,
                        "met": met})
    world, tokens = main["world_size"], main["tokens_per_rank_per_step"]
    steps = {clock: {v: {"seconds": statistics.median(main["seconds"][clock][v]),
                         "tokens_per_s": world * tokens / statistics.median(main["seconds"][clock][v])}
                     for v in STEPS} for clock in clocks()}
    mib = {part: [{k: b / 2**20 for k, b in rank.items()} if isinstance(rank, dict) else rank / 2**20
                  for rank in ranks] for part, ranks in memory.items()}
    return {
        "command": command, "preset": "quick" if args.quick else "demo", "device": get_accelerator().device_name(),
        "world_size": world, "threads_per_rank": args.threads, "torch": torch.__version__, "clocks": clocks(),
        "rounds": args.rounds, "steps_per_round": args.steps, "tokens_per_rank_per_step": tokens,
        "masked_tokens_per_rank_per_step": main["masked_tokens_per_rank_per_step"], "shapes": main["shapes"],
        "hf_attn_implementation": main["hf_attn_implementation"], "teacher_layers": main["teacher_layers"],
        "mlm_loss_check": main["mlm_loss_check"], "targets": targets, "ratios": ratios, "steps": steps,
        "core_share": main["seconds"]["core_share"], "load_average": main["load_average"],
        "matmul_peak_flops_per_rank": {c: statistics.median(main["matmul_flops"][c]["square"]) for c in clocks()},
        "breakdown": main["breakdown"], "memory_mib": mib,
        "relations_ms": {c: {key: 1e3 * statistics.median(v) for key, v in main["relation_seconds"][c].items()}
                         for c in clocks()},
        "seconds": main["seconds"], "matmul_flops": main["matmul_flops"],
        "flops_per_step_per_rank": main["flops_per_step_per_rank"], "scaling": scaling,
        "profiles": main["profiles"], "sync_sites": main["sync_sites"],
    }


def verdict(t: dict) -> str:
    if t["value"] is None:
        return "not measured (needs more than one rank)"
    off = 100 * (t["value"] / t["bound"] - 1)
    return f"{'met' if t['met'] else '**missed**'} on {t['clock']} ({off:+.0f}% against the bound)"


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + [
        "| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def phase_tables(breakdown: dict[str, dict], cs: list[str], labels: dict[str, str] | None = None) -> list[str]:
    lines = []
    for name, phases in breakdown.items():
        lines += ["", f"Phases of the {(labels or {}).get(name, name)} step, ms (share), each call drained and "
                  "timed:", ""]
        lines += table(["phase", *cs], [[phase, *(f"{1e3 * t[c]:.1f} ({100 * t[c] / phases['total'][c]:.0f}%)"
                                                  for c in cs)] for phase, t in phases.items()])
    return lines


def profile_tables(profiles: dict[str, list[dict]], labels: dict[str, str] | None = None) -> list[str]:
    lines = []
    for name, ops in profiles.items():
        lines += ["", f"Profile of one {(labels or {}).get(name, name)} step, rank 0, top ops by self time:", ""]
        lines += table(["op", "ms", "share", "calls"],
                       [[f"`{o['op']}`", f"{o['ms']:.1f}", f"{100 * o['share']:.0f}%", o["calls"]] for o in ops])
    return lines


def markdown(r: dict) -> str:
    cs = r["clocks"]

    def shown(clock: str, key: str) -> str:
        q = r["ratios"][clock].get(key)
        return "-" if q is None else f"{q['median']:.3f} ({q['min']:.3f} to {q['max']:.3f}); best {q['best']:.3f}"

    peak = ", ".join(f"{r['matmul_peak_flops_per_rank'][c] / 1e9:.1f} on {c}" for c in cs)
    lines = [f"Command: `{r['command']}`", "",
             f"{r['device']}, {r['world_size']} ranks x {r['threads_per_rank']} thread(s), torch {r['torch']}; "
             f"{r['tokens_per_rank_per_step']} tokens per rank per step ({r['masked_tokens_per_rank_per_step']:.0f} "
             f"masked); {r['rounds']} interleaved rounds x {r['steps_per_round']} step(s). Each ratio: the median "
             f"(min to max) over rounds of the ratio within a round; best: the ratio of each side's best time. "
             f"fp32 matrix-product peak, GFLOP/s per rank: {peak}. Load average at the end: "
             f"{r['load_average'][0]:.1f}.", ""]
    lines += table(["target", "bound", *(f"measured, {c}" for c in cs), "verdict"], [
        [t["target"], f"{'<=' if t['kind'] == 'max' else '>='} {t['bound']}", *(shown(c, t["key"]) for c in cs),
         verdict(t)] for t in r["targets"]])
    lines += [""] + table(["step", *(f"s/step, {c}" for c in cs), *(f"tokens/s, {c}" for c in cs),
                           *(f"MFU, {c}" for c in cs), "core share per rank"], [
        [name, *(f"{r['steps'][c][v]['seconds']:.3f}" for c in cs),
         *(f"{r['steps'][c][v]['tokens_per_s']:.0f}" for c in cs),
         *(f"{100 * r['ratios'][c][f'mfu_{v}']['median']:.0f}%" for c in cs),
         " / ".join(f"{x:.2f}" for x in r["core_share"][v])] for v, name in STEPS.items()])
    others = ("masked_head_speedup", "teacher_cut_speedup", "ffn_matmul_over_peak", "projection_matmul_over_peak",
              "scaling_dense", "scaling_moe", "scaling_tcd")
    lines += [""] + table(["other ratio", *(f"measured, {c}" for c in cs)],
                          [[k, *(shown(c, k) for c in cs)] for k in others if k in r["ratios"]["wall"]])
    lines += phase_tables(r["breakdown"], cs)
    ns = sorted({int(key.split("/")[0]) for key in r["relations_ms"]["wall"]})
    lines += ["", "Relation losses alone, forward + backward, ms per call:", ""]
    lines += table(["scope, clock"] + [f"N={n}" for n in ns],
                   [[f"{scope}, {c}"] + [f"{r['relations_ms'][c][f'{n}/{scope}']:.2f}" for n in ns]
                    for scope in ("local", "global") for c in cs])
    mem = r["memory_mib"]
    lines += ["", "Memory per rank, MiB (rank 0 / rank 1 ...): the state each variant holds after its first step "
              "(the dense one includes the data pipeline), and what a step needs on top of it:", ""]
    lines += table(["", "hf", "dense", "moe", "tcd"], [
        [part] + [" / ".join(f"{rank[v]:.0f}" for rank in mem[part]) for v in ("hf", "dense", "moe", "tcd")]
        for part in ("state", "step")])
    floor = " / ".join(f"{m:.0f}" for m in mem["floor"])
    lines.append(f"\nFloor (interpreter, libraries, process group): {floor} MiB.")
    if r["scaling"]:
        lines += ["", "Scaling launches in the order run (fixed per-rank batch): ms per step by clock, median over "
                  "blocks; the TCD step's core share per rank; the load average:", ""]
        kinds = ("dense", "moe", "tcd")
        lines += table(["ranks", *(f"{k}, {c}" for k in kinds for c in cs), "core share, tcd", "load"], [
            [rec["world_size"], *(f"{1e3 * statistics.median(rec['seconds'][c][k]):.0f}" for k in kinds for c in cs),
             " / ".join(f"{x:.2f}" for x in rec["seconds"]["core_share"]["tcd"]), f"{rec['load_average'][0]:.1f}"]
            for rec in r["scaling"]])
    lines += profile_tables(r["profiles"])
    if any(v is not None for v in r["sync_sites"].values()):
        lines += ["", f"Host-device syncs in one step (file:line): {json.dumps(r['sync_sites'])}"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ expert count (issue 13)



def expert_targets(tokens_per_rank: int) -> list[tuple[str, str, float]]:
    """Issue 23's tokens/s bounds: 64 experts >= 0.85x dense at 64 x 128 tokens per rank, >= 0.75x at the demo
    micro-batch (16 x 128); 8 experts >= 0.95x dense."""
    return [("moe64", "dense", 0.85 if tokens_per_rank >= 64 * 128 else 0.75), ("moe8", "dense", 0.95)]


def summarize_experts(r: dict, args: argparse.Namespace, command: str) -> dict:
    """The expert-count world's results with every tokens/s ratio against dense and against 8 experts (within
    each round, and of the best times) and the targets' verdicts, on CPU time where there is one."""
    world, tokens = r["world_size"], r["tokens_per_rank_per_step"]

    def ratio(s: dict, a: str, b: str) -> dict:  # tokens/s of a over tokens/s of b
        return spread([tb / ta for ta, tb in zip(s[a], s[b])], min(s[b]) / min(s[a]))

    ratios = {c: {f"{a}/{b}": ratio(r["seconds"][c], a, b) for a in EXPERT_COUNTS for b in ("dense", "moe8")}
              for c in clocks()}
    clock = "cpu" if on_cpu() else "wall"
    targets = []
    for a, b, bound in expert_targets(tokens):
        value = ratios[clock][f"{a}/{b}"]["median"]
        targets.append({"target": f"{EXPERT_COUNTS[a][2]} / {EXPERT_COUNTS[b][2]}", "key": f"{a}/{b}",
                        "bound": bound, "kind": "min", "clock": clock, "value": value, "met": value >= bound})
    tokens_per_s = {c: {n: world * tokens / statistics.median(r["seconds"][c][n]) for n in EXPERT_COUNTS}
                    for c in clocks()}
    return {"command": command, "preset": "quick" if args.quick else "demo",
            "device": get_accelerator().device_name(), "threads_per_rank": args.threads, "torch": torch.__version__,
            "clocks": clocks(), "rounds": args.rounds, "steps_per_round": args.steps, **r, "ratios": ratios,
            "targets": targets, "tokens_per_s": tokens_per_s}


def experts_markdown(r: dict) -> str:
    cs, labels, s = r["clocks"], {n: v[2] for n, v in EXPERT_COUNTS.items()}, r["seconds"]

    def shown(clock: str, key: str) -> str:
        q = r["ratios"][clock][key]
        return f"{q['median']:.2f} ({q['min']:.2f} to {q['max']:.2f})"

    lines = [f"Command: `{r['command']}`", "",
             f"{r['device']}, {r['world_size']} ranks x {r['threads_per_rank']} thread(s), torch {r['torch']}; "
             f"{r['tokens_per_rank_per_step']} tokens per rank per step; {r['rounds']} interleaved rounds x "
             f"{r['steps_per_round']} step(s). Ratios of tokens/s: the median (min to max) over rounds of the ratio "
             f"within a round. Load average at the end: {r['load_average'][0]:.1f}.", ""]
    lines += table(["target", "bound", *(f"measured, {c}" for c in cs), "verdict"], [
        [t["target"], f">= {t['bound']}", *(shown(c, t["key"]) for c in cs), verdict(t)] for t in r["targets"]])
    lines += [""] + table(["student", "params per rank", "ep_size", *(f"tokens/s, {c}" for c in cs),
                           *(f"vs dense, {c}" for c in cs), *(f"vs 8 experts, {c}" for c in cs),
                           "core share per rank"], [
        [label, f"{r['parameters'][n] / 1e6:.1f}M", r["ep_size"].get(n, "-"),
         *(f"{r['tokens_per_s'][c][n]:.0f}" for c in cs), *(shown(c, f"{n}/dense") for c in cs),
         *(shown(c, f"{n}/moe8") for c in cs), " / ".join(f"{x:.2f}" for x in s["core_share"][n])]
        for n, label in labels.items()])
    lines += phase_tables(r["breakdown"], cs, labels)
    split = r["moe_split"]
    lines += ["", "The MoE layers' forwards per step, ms (all MoE layers, rank 0; backward not split):", ""]
    lines += table(["student", *(f"{part}, {c}" for part in next(iter(split.values())) for c in cs)], [
        [labels[n], *(f"{1e3 * t.get(c, 0.0):.1f}" for t in parts.values() for c in cs)]
        for n, parts in split.items()])
    mib = 2**20
    lines += ["", "Per micro-batch, MiB (rank 0): what the MoE layers keep for backward; new tensors shaped as a "
              "layer's local expert weights (packed or one projection) created in the MoE forwards (copies) and in "
              "the backward (their gradients, and any copies); the local expert weights of all MoE layers:", ""]
    keys = ("saved for backward", "weight-shaped, forward", "weight-shaped, backward", "expert weights")
    lines += table(["student", *keys], [[labels[n], *(f"{b[k] / mib:.1f}" for k in keys)]
                                        for n, b in r["moe_bytes"].items()])
    parts = ("model", "gradients", "master weights", "optimizer state")
    lines += ["", "Memory per rank, MiB (rank 0), shared / expert parameters; ZeRO partitions each over the ranks "
              "shown:", ""]
    lines += table(["student", *parts, "partitioned over"], [
        [labels[n], *(" / ".join(f"{m[side].get(part, 0) / mib:.1f}" for side in ("shared", "expert"))
                      for part in parts),
         " / ".join(str(m[side].get("partitioned over ranks", "-")) for side in ("shared", "expert"))]
        for n, m in r["memory"][0].items()])
    lines += profile_tables(r["profiles"], labels)
    return "\n".join(lines) + "\n"
