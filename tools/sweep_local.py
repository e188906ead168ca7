"""`python tools/sweep_local.py ...`, from a checkout: `tcd-ds sweep` (tcd_ds.cli.sweep)."""

import sys

from tcd_ds.cli.sweep import main

if __name__ == "__main__":
    sys.exit(main())
