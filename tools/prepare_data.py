"""`python tools/prepare_data.py ...`, from a checkout: `tcd-ds prepare-data` (tcd_ds.cli.prepare_data)."""

import sys

from tcd_ds.cli.prepare_data import main

if __name__ == "__main__":
    sys.exit(main())
