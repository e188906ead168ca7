"""The protocol's PNG plots: pre-training curves, relation losses, expert load per MoE layer, routing telemetry over
pre-training, downstream scores."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from tcd_ds.spec import RELATION_LOCATIONS  # noqa: E402

Records = dict[str, list[dict]]  # model name -> its metrics.jsonl records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    picked = [r for r in records if key in r]
    return [r["step"] for r in picked], [r[key] for r in picked]


def pretraining_curves(records: Records, path: Path) -> None:
    fig, (train, val) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, rs in records.items():
        train.plot(*series(rs, "loss/mlm"), label=name)
        val.plot(*series(rs, "val/loss/mlm"), marker="o", label=name)
    train.set(title="training MLM loss", xlabel="step", ylabel="loss")
    val.set(title="validation MLM loss", xlabel="step")
    val.legend()
    save(fig, path)


def relation_losses(records: Records, path: Path) -> None:
    """One panel per relation location that any run logged; the teacher and the baseline log none."""
    locations = [loc for loc in RELATION_LOCATIONS if any(f"loss/{loc}" in r for rs in records.values() for r in rs)]
    fig, axes = plt.subplots(1, max(1, len(locations)), figsize=(5 * max(1, len(locations)), 4), squeeze=False)
    for ax, loc in zip(axes[0], locations):
        for name, rs in records.items():
            steps, values = series(rs, f"loss/{loc}")
            if steps:
                ax.plot(steps, values, label=name)
        ax.set(title=f"relation loss: {loc}", xlabel="step", yscale="log")
        ax.legend()
    if not locations:
        axes[0][0].text(0.5, 0.5, "no relation losses logged", ha="center", va="center")
    save(fig, path)


def expert_load(records: Records, path: Path) -> None:
    """Each MoE model's expert load per layer at its last logged step (bars), against the uniform load."""
    loads = {name: {k: v for k, v in rs[-1].items() if k.startswith("moe/load/")} for name, rs in records.items()}
    loads = {name: layers for name, layers in loads.items() if layers}
    layers = sorted({k for layer_loads in loads.values() for k in layer_loads}, key=lambda k: int(k.rsplit("_", 1)[1]))
    fig, axes = plt.subplots(1, max(1, len(layers)), figsize=(5 * max(1, len(layers)), 4), squeeze=False)
    width = 0.8 / max(1, len(loads))
    for ax, layer in zip(axes[0], layers):
        for i, (name, layer_loads) in enumerate(loads.items()):
            fractions = layer_loads[layer]
            ax.bar([e + i * width for e in range(len(fractions))], fractions, width, label=name)
            ax.axhline(1 / len(fractions), color="grey", linestyle="--", linewidth=1)
        experts = range(len(fractions))
        ax.set(title=f"expert load, {layer.removeprefix('moe/load/')}", xlabel="expert", ylabel="fraction of tokens",
               xticks=[e + width * (len(loads) - 1) / 2 for e in experts], xticklabels=list(experts))
        ax.legend()
    save(fig, path)


ROUTING_PANELS = {  # metrics.jsonl key prefix -> panel title (tcd_ds/train/routing.py defines them)
    "moe/dropped/": "tokens dropped at capacity (fraction)",
    "moe/idle_experts/": "experts with no token in the log window",
    "moe/max_load/": "largest expert load (fraction of tokens)",
    "moe/entropy/": "router entropy / log E (solid: per token, dashed: mean probabilities)",
}


def routing(records: Records, path: Path) -> None:
    """Each MoE model's routing telemetry over pre-training, one line per MoE layer. A collapse that the balance
    loss lets through shows as idle experts and drops while the entropies stay near 1."""
    fig, axes = plt.subplots(1, len(ROUTING_PANELS), figsize=(5 * len(ROUTING_PANELS), 4), squeeze=False)
    drawn = False
    for ax, (prefix, title) in zip(axes[0], ROUTING_PANELS.items()):
        for m, (name, rs) in enumerate(records.items()):
            keys = sorted({k for r in rs for k in r if k.startswith(prefix)}, key=lambda k: int(k.rsplit("_", 1)[1]))
            for n, key in enumerate(keys):
                layer = key.removeprefix(prefix)
                style = {"color": f"C{m}", "alpha": 1 - 0.6 * n / max(1, len(keys))}
                ax.plot(*series(rs, key), label=f"{name} {layer}", **style)
                if prefix == "moe/entropy/":
                    ax.plot(*series(rs, f"moe/mean_entropy/{layer}"), linestyle="--", **style)
                drawn = True
        ax.set(title=title, xlabel="step")
        ax.title.set_fontsize(9)
    if drawn:
        axes[0][0].legend(fontsize=7)
    else:
        axes[0][0].text(0.5, 0.5, "no routing telemetry logged", ha="center", va="center")
    save(fig, path)


def downstream_scores(results: dict, path: Path) -> None:
    """Per column: each seed's score (dots) and the mean with its standard deviation, per model (top); each
    model's paired difference to the MoE baseline with its t interval over seeds, filled where it excludes zero
    (bottom)."""
    columns = list(results["models"][0]["downstream"])
    fig, axes = plt.subplots(2, len(columns), figsize=(max(5, 1.2 * len(results["models"])) * len(columns), 7),
                             squeeze=False)
    names = [m["name"] for m in results["models"]]
    for top, bottom, column in zip(axes[0], axes[1], columns):
        for x, m in enumerate(results["models"]):
            d = m["downstream"][column]
            top.scatter([x] * len(d["scores"]), d["scores"], color="grey", s=12, zorder=2)
            top.errorbar(x, d["mean"], yerr=d["std"], fmt="o", color="C0", capsize=4, zorder=3)
            diff = m["differences"][column].get("moe")
            if diff is not None:
                t = diff["t"]
                bottom.errorbar(x, t["mean"], yerr=[[t["mean"] - t["low"]], [t["high"] - t["mean"]]], fmt="o",
                                capsize=4, color="C3", mfc="C3" if t["excludes_zero"] else "white")
        d = results["models"][0]["downstream"][column]
        top.set(title=column, ylabel=f"{d['split']} {d['metric']}", xticks=range(len(names)))
        top.set_xticklabels(names, rotation=20)
        bottom.axhline(0, color="grey", lw=0.8)
        bottom.set(ylabel="minus moe (95% t interval)", xticks=range(len(names)))
        bottom.set_xticklabels(names, rotation=20)
    save(fig, path)


def teacher_strength(points: list[dict], moe: dict, path: Path) -> None:
    """Per column: the TCD student's downstream score (mean, t interval of its difference to moe) and its
    out-of-domain MLM loss against the teacher's validation MLM loss at the checkpoint it was distilled from; the
    MoE baseline as a horizontal band (its mean ± standard deviation over seeds)."""
    columns = list(points[0]["downstream"])
    fig, axes = plt.subplots(1, len(columns) + 1, figsize=(5 * (len(columns) + 1), 4), squeeze=False)
    x = [p["teacher_val_mlm"] for p in points]
    for ax, column in zip(axes[0], columns):
        base = moe["downstream"][column]
        ax.axhspan(base["mean"] - base["std"], base["mean"] + base["std"], color="grey", alpha=0.25, label="moe")
        means = [p["downstream"][column]["mean"] for p in points]
        diffs = [p["differences"][column]["moe"] for p in points]
        errors = [[d["mean"] - d["t"]["low"] for d in diffs], [d["t"]["high"] - d["mean"] for d in diffs]]
        ax.errorbar(x, means, yerr=errors, fmt="o-", capsize=4, label="tcd (95% t interval of its difference to moe)")
        for xi, yi, p in zip(x, means, points):
            ax.annotate(f"step {p['teacher_step']}", (xi, yi), fontsize=7, textcoords="offset points", xytext=(4, 4))
        d = points[0]["downstream"][column]
        ax.set(title=column, xlabel="teacher MLM loss (val): weaker ->", ylabel=f"{d['split']} {d['metric']}")
        ax.legend(fontsize=7)
    ood = axes[0][-1]
    ood.axhline(moe["ood_mlm"]["loss"], color="grey", label="moe")
    ood.plot(x, [p["ood_mlm"]["loss"] for p in points], "o-", label="tcd")
    ood.set(title="out-of-domain MLM", xlabel="teacher MLM loss (val): weaker ->", ylabel="MLM loss")
    ood.legend(fontsize=7)
    save(fig, path)


def save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(records: Records, results: dict, directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    names = ("pretraining", "relation_losses", "expert_load", "routing", "downstream")
    paths = [directory / f"{name}.png" for name in names]
    pretraining_curves(records, paths[0])
    relation_losses(records, paths[1])
    expert_load(records, paths[2])
    routing(records, paths[3])
    downstream_scores(results, paths[4])
    if "teacher_strength" in results:
        paths.append(directory / "teacher_strength.png")
        moe = next(m for m in results["models"] if m["name"] == "moe")
        teacher_strength(results["teacher_strength"], moe, paths[-1])
    return paths
