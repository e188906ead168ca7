"""`python launchers/probe.py ...`, from a checkout: `tcd-ds probe` (tcd_ds.cli.probe)."""

import sys

from tcd_ds.cli.probe import main

if __name__ == "__main__":
    sys.exit(main())
