"""`deepspeed --num_gpus N launchers/pretrain.py --spec SPEC ...`, from a checkout: tcd_ds.cli.pretrain."""

import sys

from tcd_ds.cli.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
