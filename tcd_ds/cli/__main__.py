import sys

from tcd_ds.cli import main

sys.exit(main())
