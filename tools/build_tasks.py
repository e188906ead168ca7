"""`python tools/build_tasks.py ...`, from a checkout: `tcd-ds build-tasks` (tcd_ds.cli.build_tasks)."""

import sys

from tcd_ds.cli.build_tasks import main

if __name__ == "__main__":
    sys.exit(main())
