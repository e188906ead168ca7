"""A checkpoint's full fp32 state dict, in the names of the DeepSpeed-free model (every expert by global id).

DeepSpeed spreads a student over three kinds of file: the non-expert module weights, one file per (MoE layer,
expert) and, per rank, a ZeRO shard with that rank's slice of the fp32 master weights. A run trained in fp32
trains the module weights themselves, so those are used; a bf16/fp16 run's module and expert files hold
rounded copies, so its weights are rebuilt from the masters in the shards.
"""

from __future__ import annotations

import pickle
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tcd_ds.models.batched_experts import unpack_experts
from tcd_ds.rundir.layout import Checkpoint, CheckpointError
from tcd_ds.spec import ModelSpec

LOCAL_EXPERT = re.compile(r"(\.deepspeed_experts\.)(\d+)(\.)")
PACKED_EXPERTS = re.compile(r"\.deepspeed_moe\.experts\.(?P<kind>weight|bias)(@(?P<first>\d+))?$")


def load_file(path: Path, allowed_types: list[type] | None = None) -> dict[str, Any]:
    """`torch.load(weights_only=True)`: tensors and plain containers only, plus `allowed_types` (never
    arbitrary code). A missing, truncated or corrupt file is a CheckpointError naming it."""
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file {path}")
    try:
        with torch.serialization.safe_globals(allowed_types or []):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"cannot read {path}: truncated or corrupt? ({type(e).__name__}: {e})") from e


def zero_shard_types() -> list[type]:
    """The DeepSpeed objects a ZeRO optimizer shard pickles besides tensors (its loss scaler, the ZeRO stage,
    fragment addresses). Allowing exactly these keeps the shards on `weights_only=True`, where DeepSpeed's own
    zero_to_fp32.py loads them with `weights_only=False`, i.e. runs whatever the pickle says."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def expert_prefix(layer: int, expert: int) -> str:
    return f"bert.encoder.layer.{layer}.output.dense.deepspeed_moe.experts.deepspeed_experts.{expert}."


def expert_weights(ckpt: Checkpoint, model: ModelSpec) -> dict[str, Tensor]:
    """Every expert of every MoE layer, from its own file (DeepSpeed already names it by global id)."""
    weights = {}
    for k, layer in enumerate(model.moe.layer_ids(model.num_layers)):
        for expert in range(model.moe.num_experts):
            path = ckpt.expert_file(k, expert)
            if not path.is_file():
                raise CheckpointError(f"missing expert file {path} (MoE layer {layer}, expert {expert})")
            part = load_file(path)
            prefix = expert_prefix(layer, expert)
            if not part or any(not name.startswith(prefix) for name in part):
                raise CheckpointError(f"{path} should hold {prefix}* and holds {sorted(part)}")
            weights.update(part)
    return weights


def fp32_master_weights(ckpt: Checkpoint, dtype: str, world_size: int, model: ModelSpec) -> dict[str, Tensor]:
    """Flat fp32 masters, by global name, stitched from every rank's ZeRO shard.

    A shard holds, per optimizer param group, one flat fp32 partition and, per parameter, where its fragment
    lies in it (`param_slice_mappings`, named as on that rank: local expert ids). A parameter is its fragments
    concatenated in rank order, because each param group is partitioned over a data-parallel group whose ranks
    ascend: all ranks for shared weights, ranks {r, r + ep_size, ...} for experts (DeepSpeed's expert+data
    layout, in which rank r holds the experts of expert-parallel rank r % ep_size).
    """
    ep_size = model.moe.ep_size if model.moe else 1
    local_experts = model.moe.num_experts // ep_size if model.moe else 0
    fragments: dict[str, list[Tensor]] = defaultdict(list)
    for rank in range(world_size):
        path = ckpt.optimizer_shard(rank, dtype)
        state = load_file(path, zero_shard_types()).get("optimizer_state_dict", {})
        if "single_partition_of_fp32_groups" not in state or "param_slice_mappings" not in state:
            raise CheckpointError(f"{path} holds no ZeRO fp32 master partitions (ZeRO stage 1 or 2 expected)")
        first_expert = (rank % ep_size) * local_experts
        for partition, mapping in zip(state["single_partition_of_fp32_groups"], state["param_slice_mappings"]):
            for name, fragment in mapping.items():
                if PACKED_EXPERTS.search(name):  # one name per expert-parallel rank's block of experts
                    name = f"{name}@{first_expert}"
                name = LOCAL_EXPERT.sub(lambda m: f"{m[1]}{first_expert + int(m[2])}{m[3]}", name)
                fragments[name].append(partition.narrow(0, fragment.start, fragment.numel))
    masters = {name: torch.cat(parts) for name, parts in fragments.items()}
    return unpack_packed_experts(masters, model, local_experts) if model.moe else masters


def unpack_packed_experts(masters: dict[str, Tensor], model: ModelSpec, local_experts: int) -> dict[str, Tensor]:
    """The packed expert masters (`...experts.weight@{first expert}`, `...experts.bias@...`, written since the
    experts are stored packed, tcd_ds.models.batched_experts) under the per-expert global names the expert
    files use; masters of checkpoints written before, already per expert, pass unchanged."""
    out = {}
    for name, value in masters.items():
        match = PACKED_EXPERTS.search(name)
        if not match or match["kind"] == "bias":
            if not match:
                out[name] = value
            continue
        bias_name = name[:match.start("kind")] + "bias" + name[match.end("kind"):]
        prefix, first = name[:match.start("kind")], int(match["first"])
        weight, bias = value.view(local_experts, -1), masters[bias_name].view(local_experts, -1)
        for local, tensor in unpack_experts(weight, bias, model.hidden_size, model.intermediate_size).items():
            out[prefix + LOCAL_EXPERT.sub(lambda m: f"{m[1]}{first + int(m[2])}{m[3]}", "." + local)[1:]] = tensor
    return out


def full_state_dict(ckpt: Checkpoint, model: ModelSpec, dtype: str) -> tuple[dict[str, Tensor], int]:
    """The checkpoint's weights and step. Module weights + experts; for bf16/fp16 runs every trained parameter
    replaced by its fp32 master; tied names (DeepSpeed's `shared_params`, e.g. the MLM decoder) pointed at
    their source; all fp32."""
    states = load_file(ckpt.model_states)
    if not isinstance(states.get("module"), dict):
        raise CheckpointError(f"{ckpt.model_states} holds no module state dict")
    weights = dict(states["module"])
    shared = states.get("shared_params") or {}
    if model.moe is not None:
        weights.update(expert_weights(ckpt, model))
    if dtype != "fp32":
        masters = fp32_master_weights(ckpt, dtype, states["dp_world_size"], model)
        untrained = set(shared) | set(states.get("buffer_names") or []) | set(states.get("frozen_param_shapes") or {})
        for name, value in weights.items():
            if name in untrained:
                continue
            if name not in masters:
                raise CheckpointError(f"{ckpt.dir}: no fp32 master weight for {name} in the ZeRO shards")
            if masters[name].numel() != value.numel():
                raise CheckpointError(
                    f"{ckpt.dir}: the ZeRO shards hold {masters[name].numel()} of the {value.numel()} elements of "
                    f"{name}; a shard is missing or from another run"
                )
            weights[name] = masters[name].view(value.shape)
    for alias, source in shared.items():
        weights[alias] = weights[source]
    weights = {name: value.float() if value.is_floating_point() else value for name, value in weights.items()}
    return weights, int(states.get("step", states.get("global_steps")))
