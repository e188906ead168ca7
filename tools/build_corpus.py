"""`python tools/build_corpus.py ...`, from a checkout: `tcd-ds build-corpus` (tcd_ds.cli.build_corpus)."""

import sys

from tcd_ds.cli.build_corpus import main

if __name__ == "__main__":
    sys.exit(main())
