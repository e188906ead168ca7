"""The device a launch trains on, settled before any CUDA work: no CPU training by mistake on a GPU machine, and
the opt-in deterministic mode (`train.deterministic`)."""

from __future__ import annotations

import os

import torch

ALLOW_CPU = "TCD_DS_ALLOW_CPU_ON_GPU"


class AcceleratorMismatch(RuntimeError):
    """DeepSpeed's accelerator is the CPU although this machine has CUDA devices."""


def check_accelerator(accelerator: str, cuda_available: bool | None = None) -> None:
    """Refuse a CPU accelerator where CUDA is available: a `DS_ACCELERATOR=cpu` left over from a CPU recipe would
    otherwise train on CPU with gloo, silently and ~100x slower. Setting TCD_DS_ALLOW_CPU_ON_GPU=1 says it is meant."""
    cuda_available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if accelerator == "cpu" and cuda_available and os.environ.get(ALLOW_CPU) != "1":
        raise AcceleratorMismatch(
            f"DeepSpeed's accelerator is the CPU (DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR')!r}) but "
            f"{torch.cuda.device_count()} CUDA device(s) are available: unset DS_ACCELERATOR to train on them, or "
            f"set {ALLOW_CPU}=1 to train on the CPU anyway"
        )


def set_deterministic(enabled: bool) -> None:
    """Bitwise-reproducible kernels on CUDA: torch raises on an op without a deterministic implementation, and cuBLAS
    needs a fixed workspace (read when its handle is created: this runs before any CUDA work). NCCL's reductions are
    reproducible for the same world size, topology and NCCL version. CPU kernels are deterministic already."""
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def prepare_device(accelerator: str, deterministic: bool) -> None:
    """What a launch does first, before the process group and the model exist."""
    check_accelerator(accelerator)
    set_deterministic(deterministic)
