"""`python tools/convert_to_hf.py ...`, from a checkout: `tcd-ds convert` (tcd_ds.cli.convert)."""

import sys

from tcd_ds.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
