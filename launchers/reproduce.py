"""`python launchers/reproduce.py ...`, from a checkout: `tcd-ds reproduce` (tcd_ds.cli.reproduce)."""

import sys

from tcd_ds.cli.reproduce import main

if __name__ == "__main__":
    sys.exit(main())
