"""The out-of-domain MLM probe of a converted model (tools/convert_to_hf.py): MLM loss and accuracy on text files.

    python launchers/probe.py HF_DIR data/tasks/nyt_editorials/sentences.txt [--seq-len 128] [--out probe.json]

The text is blocked and masked as the pre-training validation set is, with a fixed seed, so models that share a
tokenizer are scored on the same tokens. One process, on DeepSpeed's accelerator (CUDA if present, else CPU).
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from deepspeed.accelerator import get_accelerator

from tcd_ds.downstream.mlm_probe import mlm_probe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a Hugging Face directory written by tools/convert_to_hf.py")
    parser.add_argument("files", nargs="+", help="text files, one sentence or paragraph a line")
    parser.add_argument("--name", default="probe", help="the probe's name, recorded in the result")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cache-dir", default=".cache/tcd_ds")
    parser.add_argument("--out", help="result JSON (default: print only)")
    args = parser.parse_args(argv)
    missing = [f for f in args.files if not Path(f).is_file()]
    if missing:
        print(f"probe: error: text file(s) not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    device = torch.device(get_accelerator().current_device_name())
    result = mlm_probe(args.model, args.files, device, args.seq_len, args.batch_size, args.cache_dir)
    print(result)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"probe": args.name, "files": args.files, **result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
