"""The generated DeepSpeed config as a GPU run needs it, and DeepSpeed 0.19 honouring it in a real ZeRO-2 engine:
no throughput timer (a device synchronize per forward and step), fp32 gradient accumulation and reduction under
bf16 (checked against an fp64 sum of the bf16 micro-batch gradients), ZeRO-2 overlap and buckets by accelerator;
the opt-in deterministic mode; the refusal of a CPU accelerator on a CUDA machine."""

import copy
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch
import torch.multiprocessing as mp

from conftest import free_port
from tcd_ds.spec import RunSpec
from tcd_ds.train.device import ALLOW_CPU, AcceleratorMismatch, check_accelerator, set_deterministic
from tcd_ds.train.ds_config import CPU_BUCKET, GPU_REDUCE_BUCKET, deepspeed_config

GAS, MICRO, WIDTH = 4, 8, 64


def spec(**train) -> RunSpec:
    return RunSpec.model_validate({"train": {"global_batch_size": GAS * MICRO, "micro_batch_size": MICRO, **train}})


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_no_timer_and_fp32_gradients_whatever_the_weights(dtype):
    config = deepspeed_config(spec(dtype=dtype), world_size=1, accelerator="cuda")
    assert config["timers"]["throughput"]["enabled"] is False and config["wall_clock_breakdown"] is False
    if dtype == "fp32":
        assert "data_types" not in config and "communication_data_type" not in config
    else:
        assert config["data_types"] == {"grad_accum_dtype": "fp32"} and config["communication_data_type"] == "fp32"


def test_zero2_overlaps_and_buckets_on_gpu_only():
    gpu = deepspeed_config(spec(), 1, accelerator="cuda")["zero_optimization"]
    cpu = deepspeed_config(spec(), 1, accelerator="cpu")["zero_optimization"]
    assert gpu["overlap_comm"] and gpu["reduce_bucket_size"] == GPU_REDUCE_BUCKET
    assert not cpu["overlap_comm"] and cpu["reduce_bucket_size"] == CPU_BUCKET
    forced = spec()
    forced.parallel.overlap_comm, forced.parallel.reduce_bucket_size = True, 1000
    zero = deepspeed_config(forced, 1, accelerator="cpu")["zero_optimization"]
    assert zero["overlap_comm"] and zero["reduce_bucket_size"] == 1000 and zero["allgather_bucket_size"] == CPU_BUCKET


def engine_worker(rank: int, port: int, out: str) -> None:
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    set_deterministic(True)  # and a DeepSpeed step still runs on CPU with it
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.Tanh(), torch.nn.Linear(WIDTH, 1))
    reference = copy.deepcopy(model).bfloat16()
    config = deepspeed_config(spec(dtype="bf16"), world_size=1, accelerator="cpu")
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                      config=config)
    sums = [torch.zeros(p.shape, dtype=torch.float64) for p in reference.parameters()]
    for micro in range(GAS):
        x = torch.randn(MICRO, WIDTH, generator=torch.Generator().manual_seed(micro)).bfloat16()
        engine.backward(engine(x).square().mean() * 100)
        loss = reference(x).square().mean() * 100
        for total, grad in zip(sums, torch.autograd.grad(loss, list(reference.parameters()))):
            total += grad.double() / GAS  # the bf16 gradient of each micro-batch, summed exactly
    got = [safe_get_full_grad(p) for p in model.parameters()]
    torch.save({"types": engine.get_data_types(), "comm": engine.communication_data_type,
                "accum": engine.optimizer.gradient_accumulation_dtype, "timer": engine.tput_timer.config.enabled,
                "got": got, "want": sums, "deterministic": torch.are_deterministic_algorithms_enabled(),
                "cublas": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}, out)
    engine.step()


def test_deepspeed_accumulates_and_reduces_bf16_gradients_in_fp32(tmp_path):
    out = str(tmp_path / "engine.pt")
    mp.spawn(engine_worker, args=(free_port(), out), nprocs=1, join=True)
    r = torch.load(out, weights_only=False)
    assert r["types"] == (torch.bfloat16, torch.float32) and r["comm"] == torch.float32
    assert r["accum"] == torch.float32 and r["timer"] is False
    assert r["deterministic"] and r["cublas"] == ":4096:8"
    for got, want in zip(r["got"], r["want"]):
        assert got.dtype == torch.float32
        # fp32 sums of 4 bf16 gradients are exact to fp32 rounding; bf16 sums would be off by ~1e-2 relative
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-9)
        assert not torch.equal(want.bfloat16().double(), want)  # the sum is not representable in bf16


def test_a_cpu_accelerator_on_a_cuda_machine_is_refused(monkeypatch):
    monkeypatch.delenv(ALLOW_CPU, raising=False)
    with pytest.raises(AcceleratorMismatch, match="unset DS_ACCELERATOR"):
        check_accelerator("cpu", cuda_available=True)
    check_accelerator("cuda", cuda_available=True)
    check_accelerator("cpu", cuda_available=False)
    monkeypatch.setenv(ALLOW_CPU, "1")
    check_accelerator("cpu", cuda_available=True)
