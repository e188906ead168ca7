"""Expert data parallelism (world size > ep_size: each expert replicated on world / ep_size ranks, its gradients
reduced across them), on 4 CPU ranks: real DeepSpeed ZeRO-2 engines, checked against one process holding every
expert; then real training runs of both layouts converted and resumed elastically."""

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from deepspeed.utils import groups

from conftest import STUDENT_MOE, final_weights, free_port
from tcd_ds.hf.convert import convert
from tcd_ds.models.batched_experts import named_tensors
from tcd_ds.models.build import build_model
from tcd_ds.models.modeling_moe_bert import MoEBertForMaskedLM
from tcd_ds.models.param_groups import moe_param_groups
from test_models_dist import E, V, init_rank, rank_batch, spawn, spec

WORLD = 4
TIED = {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}  # the word embeddings, the head's bias


def global_experts(model, ep_size: int) -> dict[str, torch.Tensor]:
    """This rank's expert tensors under their global ids (g = ep_rank * E / ep_size + j)."""
    ep_rank, local = groups._get_expert_parallel_rank(f"ep_size_{ep_size}"), E // ep_size
    out = {}
    for name, p in named_tensors(model).items():
        if ".deepspeed_experts." in name:
            prefix, rest = name.split(".deepspeed_experts.")
            j, param = rest.split(".", 1)
            out[f"{prefix}.deepspeed_experts.{ep_rank * local + int(j)}.{param}"] = p.clone()
    return out


def full_state(model, ep_size: int) -> dict[str, torch.Tensor]:
    """Every rank's parameters by global name; replicas of an expert (and the shared weights) must agree."""
    mine = {n: p.clone() for n, p in named_tensors(model).items() if ".deepspeed_experts." not in n}
    mine.update(global_experts(model, ep_size))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    state = {}
    for rank, theirs in enumerate(gathered):
        for name, tensor in theirs.items():
            if name in state:
                assert torch.equal(state[name], tensor), f"{name} differs between replicas (rank {rank})"
            state[name] = tensor
    return state


def engine_for(ep_size: int, rank: int, lr: float):
    torch.manual_seed(0)
    model = build_model(spec(ep_size=ep_size, drop_tokens=False), V, pad_token_id=0)
    model.config.balance_weight = 0.0  # the MLM loss only: the balance loss of a batch is not the mean of its parts
    torch.manual_seed(1 + rank)  # distinct experts per rank: the engine must broadcast each from one replica
    for block in model.moe_blocks().values():
        for p in block.deepspeed_moe.experts.parameters():
            p.data.normal_(0.0, 0.2)
    config = {"train_micro_batch_size_per_gpu": 2, "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0,
              "zero_optimization": {"stage": 2, "contiguous_gradients": True, "reduce_scatter": True}}
    optimizer = torch.optim.SGD(moe_param_groups(model, weight_decay=0.0), lr=lr)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return model, engine


def gradients_worker(rank: int, world_size: int, port: int) -> None:
    init_rank(rank, world_size, port)
    for ep_size in (2, 4):
        model, engine = engine_for(ep_size, rank, lr=1.0)
        before = full_state(model, ep_size)
        ids, mask = rank_batch(rank)
        engine.backward(engine(ids, attention_mask=mask, labels=ids).loss)
        engine.step()  # SGD, lr 1, no decay or clipping: the update is minus the reduced gradient
        after = full_state(model, ep_size)

        # One process, every expert, the concatenated batch (every rank's tokens are labelled, 12 each, so its
        # mean loss is the mean of the ranks' losses that data parallelism averages).
        reference = build_model(spec(ep_size=1, drop_tokens=False), V, pad_token_id=0)
        reference.config.balance_weight = 0.0
        missing, unexpected = reference.load_state_dict(before, strict=False)
        assert not unexpected and set(missing) == TIED, (missing, unexpected)
        batches = [rank_batch(r) for r in range(world_size)]
        all_ids, all_mask = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        reference(all_ids, attention_mask=all_mask, labels=all_ids).loss.backward()
        for name, grad in named_tensors(reference, grads=True).items():
            torch.testing.assert_close(before[name] - after[name], grad, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, name=name: f"ep_size {ep_size}, {name}: {m}")

        for step in range(3):  # replicas stay identical (full_state asserts it), with every rank's own batch
            ids, mask = rank_batch(rank + world_size * (step + 1))
            engine.backward(engine(ids, attention_mask=mask, labels=ids).loss)
            engine.step()
        full_state(model, ep_size)
    dist.destroy_process_group()


def test_expert_gradients_equal_one_process_with_the_concatenated_batch():
    """ep_size 2 (two replicas of each expert) and 4 on 4 ranks: after one step each expert's (and each shared
    weight's) update is the gradient of the whole batch, not a multiple of it; replicas stay identical."""
    spawn(gradients_worker, WORLD)


# --- real runs: both layouts trained by `Trainer` on 4 ranks, converted, and resumed on 2 ranks with ep_size 2 ---

LAYOUTS = (2, 4)  # ep_size on 4 ranks
NO_DROPS = "--model.moe.eval_capacity_factor=4.0"  # = num_experts: DeepSpeed's eval drops nothing (test_convert.py)


def run_overrides(run_dir: Path, cache_dir: Path, ep_size: int, steps: int, *extra: str) -> list[str]:
    return [f"--run_dir={run_dir}", f"--data.cache_dir={cache_dir}", f"--train.steps={steps}",
            "--checkpoint.every=2", "--train.eval_every=100", "--logging.progress_bar=False",
            "--train.micro_batch_size=4", f"--model.moe.ep_size={ep_size}", NO_DROPS, *extra]


def trainer_worker(rank: int, world_size: int, port: int, root: str, cache_dir: str, resume_from: str) -> None:
    """Train each layout 2 steps and write each rank's engine eval logits on a fixed batch; or (resume_from set)
    resume that run with ep_size 2 on this world, at a learning rate too small to move an fp32 weight."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    from ds_eval_logits import fixed_batch
    from tcd_ds.spec import load_spec
    from tcd_ds.train.trainer import Trainer

    if resume_from:
        Trainer(load_spec(STUDENT_MOE, run_overrides(Path(resume_from), Path(cache_dir), 2, 3, "--optim.lr=1e-30"))).fit()
        return
    for ep_size in LAYOUTS:
        run_dir = Path(root) / f"ep{ep_size}"
        trainer = Trainer(load_spec(STUDENT_MOE, run_overrides(run_dir, Path(cache_dir), ep_size, 2)))
        trainer.fit()
        trainer.engine.eval()
        ids, mask = fixed_batch(rank, len(trainer.tokenizer), trainer.tokenizer.pad_token_id)
        with torch.no_grad():
            logits = trainer.engine(input_ids=ids, attention_mask=mask).logits
        torch.save({"input_ids": ids, "attention_mask": mask, "logits": logits}, run_dir / f"logits.rank{rank}.pt")


def spawn_trainers(world_size: int, *args: str) -> None:
    mp.spawn(trainer_worker, args=(world_size, free_port(), *args), nprocs=world_size, join=True)


def test_both_layouts_convert_to_the_engines_logits_and_resume_on_2_ranks(tmp_path, cache_dir):
    """Each 4-rank layout's checkpoint (expert files by global id, two writers' worth of replicas at ep_size 2)
    converts to a model whose logits are the engine's eval logits on every rank's batch; the ep_size-4 run then
    resumes on 2 ranks with ep_size 2 (module weights only), and saves the weights it loaded."""
    spawn_trainers(WORLD, str(tmp_path), str(cache_dir), "")
    for ep_size in LAYOUTS:
        run_dir = tmp_path / f"ep{ep_size}"
        model = MoEBertForMaskedLM.from_pretrained(convert(run_dir, tmp_path / f"hf{ep_size}")).eval()
        assert model.config.num_experts == E and not model.config.eval_drop_tokens
        for rank in range(WORLD):
            result = torch.load(run_dir / f"logits.rank{rank}.pt", weights_only=True)
            with torch.no_grad():
                logits = model(input_ids=result["input_ids"], attention_mask=result["attention_mask"]).logits
            torch.testing.assert_close(logits, result["logits"], rtol=0, atol=1e-5, msg=f"ep_size {ep_size}")
    original = final_weights(tmp_path / "ep4")
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "ep4", resumed)
    spawn_trainers(2, str(tmp_path), str(cache_dir), str(resumed))
    assert json.loads((resumed / "checkpoints" / "step_3" / "manifest.json").read_text())["ep_size"] == 2
    weights = final_weights(resumed)
    assert weights.keys() == original.keys()
    for name, tensor in original.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=0, msg=name)
