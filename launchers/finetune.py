"""`python launchers/finetune.py ...`, from a checkout: `tcd-ds finetune` (tcd_ds.cli.finetune)."""

import sys

from tcd_ds.cli.finetune import main

if __name__ == "__main__":
    sys.exit(main())
