"""The out-of-domain MLM probe of a converted model (`tcd-ds convert`): MLM loss and accuracy on text files.

    tcd-ds probe HF_DIR [--files a.txt b.txt] [--seq_len 128] [--out probe.json] [--key=value ...] [--dry-run]

The text (by default the bundled NYT editorial sentences) is blocked and masked as the pre-training validation
set is, with a fixed seed, so models that share a tokenizer are scored on the same tokens. One process, on
DeepSpeed's accelerator (CUDA if present, else CPU). Every setting is a field of the probe spec
(`--print-schema`); the protocol preset's `probe` section takes the same ones. Exit status 2: the spec, the model
directory or a text file cannot be used.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tcd_ds.cli.common import start_model_command
from tcd_ds.downstream.spec import ProbeSpec
from tcd_ds.spec import dump_spec


def main(argv: list[str] | None = None) -> int:
    from tcd_ds.checks import check_text_files

    started = start_model_command(sys.argv[1:] if argv is None else argv, __doc__, ProbeSpec, "probe spec",
                                  lambda spec: check_text_files(spec.files, "files"))
    if isinstance(started, int):
        return started
    line, spec, _ = started
    if "dry-run" in line.flags:
        print(dump_spec(spec), end="")
        return 0
    import torch
    from deepspeed.accelerator import get_accelerator

    from tcd_ds.downstream.mlm_probe import mlm_probe

    device = torch.device(get_accelerator().current_device_name())
    result = mlm_probe(spec.model, spec.files, device, spec.seq_len, spec.batch_size, spec.cache_dir)
    print(result)
    if spec.out:
        Path(spec.out).parent.mkdir(parents=True, exist_ok=True)
        Path(spec.out).write_text(json.dumps({"probe": spec.name, "files": spec.files, **result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
