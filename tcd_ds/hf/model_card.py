"""The README.md of a converted directory: which run and step it came from, the spec in brief, how it loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tcd_ds.rundir import Checkpoint, RunDir
from tcd_ds.spec import RELATION_LOCATIONS, ModelSpec


def metrics_at(metrics_file: Path, step: int) -> dict[str, float]:
    """The losses and validation metrics logged at `step` (none if it was not a logged step)."""
    if not metrics_file.is_file():
        return {}
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    at_step = [r for r in records if r.get("step") == step]
    if not at_step:
        return {}
    return {k: v for k, v in at_step[-1].items() if k.startswith(("loss/", "val/")) and isinstance(v, float)}


def spec_summary(spec: dict[str, Any], model_spec: ModelSpec, vocab_size: int) -> list[str]:
    model, train, data, optim = spec["model"], spec.get("train", {}), spec.get("data", {}), spec.get("optim", {})
    lines = [
        f"- model: hidden size {model['hidden_size']}, {model['num_layers']} layers, {model['num_heads']} heads, "
        f"FFN size {model['intermediate_size']}, {model['max_position']} positions, vocabulary {vocab_size}"
    ]
    if (moe := model.get("moe")) is not None:
        lines.append(
            f"- MoE: {moe['num_experts']} top-1 experts in layers {model_spec.moe.layer_ids(model_spec.num_layers)}, "
            f"capacity factor "
            f"{moe['capacity_factor']} (eval {moe['eval_capacity_factor']}), min capacity {moe['min_capacity']}, "
            f"drop tokens {moe['drop_tokens']}, balance loss {moe['balance_loss']} x {moe['balance_weight']}; "
            f"trained with ep_size {moe['ep_size']}"
        )
    lines.append(
        f"- training: {train.get('steps')} steps of {train.get('global_batch_size')} sequences x "
        f"{data.get('seq_len')} tokens, lr {optim.get('lr')}, {train.get('dtype')}, seed {spec.get('seed')}"
    )
    if (distill := spec.get("distill")) is not None:
        enabled = [
            f"{loc} x {distill[loc]['weight']} (layers {distill[loc]['layers']})"
            for loc in RELATION_LOCATIONS if distill[loc]["enabled"]
        ]
        lines.append(f"- distillation from `{distill['teacher']}`: {', '.join(enabled) or 'no relation enabled'}")
    return lines


def usage(is_moe: bool) -> list[str]:
    if not is_moe:
        return [
            "A plain BERT: `transformers.BertForMaskedLM.from_pretrained(path)` or `AutoModelForMaskedLM`.",
        ]
    return [
        "An MoE BERT (`model_type: moe_bert`), loaded in either of two ways, neither needing DeepSpeed:",
        "",
        "- with tcd-ds installed: `tcd_ds.models.register_auto_classes()`, then",
        "  `AutoModelForMaskedLM.from_pretrained(path)`;",
        "- without it: `AutoModelForMaskedLM.from_pretrained(path, trust_remote_code=True)` runs the",
        "  `modeling_moe_bert.py` shipped here.",
        "",
        "`AutoModelForSequenceClassification` loads it the same way for fine-tuning (a new pooler and classifier on",
        "the encoder). As in HF's MoE models, the output's `aux_loss` is the load-balancing loss and `loss` includes",
        "it with the config's `balance_weight`, as pre-training did (set `config.balance_weight = 0` to leave it out).",
        "",
        "Routing is DeepSpeed's top-1 gate in plain PyTorch; eval and inference drop no token (`eval_drop_tokens`",
        "in config.json; see the docstring of `modeling_moe_bert.py`). `model.safetensors` holds each expert under",
        "its own name (`...experts.deepspeed_experts.{e}.dense_in.weight`); the model stacks them on loading, and",
        "`save_pretrained` writes them back the same way.",
    ]


def model_card(
    ckpt: Checkpoint, spec: dict[str, Any], model_spec: ModelSpec, step: int, vocab_size: int, weights_source: str
) -> str:
    is_moe = model_spec.moe is not None
    if not is_moe:
        kind = "A dense BERT (teacher)"
    elif spec.get("distill") is not None:
        kind = "An MoE BERT student trained with transfer capability distillation"
    else:
        kind = "An MoE BERT baseline (no teacher)"
    tags = ["bert", "mixture-of-experts", "tcd-ds"] if is_moe else ["bert", "tcd-ds"]
    lines = [
        "---",  # the metadata the Hugging Face Hub reads
        "library_name: transformers",
        "pipeline_tag: fill-mask",
        f"tags: [{', '.join(tags)}]",
        "---",
        "",
        f"# {ckpt.run_dir.name} at {ckpt.tag}",
        "",
        f"{kind}, pre-trained with masked language modelling by tcd-ds and converted by "
        f"`tools/convert_to_hf.py` from the run `{ckpt.run_dir.resolve()}`, checkpoint `{ckpt.tag}` "
        f"(step {step} of {spec.get('train', {}).get('steps')}). Weights: {weights_source}.",
        "",
        "## Spec summary",
        "",
        *spec_summary(spec, model_spec, vocab_size),
    ]
    if metrics := metrics_at(RunDir(ckpt.run_dir).metrics_file, step):
        lines += ["", f"## Metrics logged at step {step}", ""]
        lines += [f"- {name}: {value:.4g}" for name, value in sorted(metrics.items())]
    lines += ["", "## Loading", "", *usage(is_moe), ""]
    return "\n".join(lines)
