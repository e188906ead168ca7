"""Regenerate the bundled corpus (tcd_ds/bundled/wiki/{train,validation}.txt) from a MediaWiki XML dump.

    tcd-ds build-corpus DUMP.xml.bz2 --out tcd_ds/bundled/wiki [--validation-every 20]
"""

import argparse
import sys
from collections import Counter
from pathlib import Path

from tcd_ds.cli.common import refuse
from tcd_ds.data.wikitext import iter_articles, wikitext_to_paragraphs



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tcd-ds build-corpus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dump", help="MediaWiki pages-articles .xml.bz2 (shared/data/raw/enwiki-sample.xml.bz2)")
    parser.add_argument("--out", required=True, help="where to write (the bundled copy is tcd_ds/bundled/wiki)")
    parser.add_argument("--validation-every", type=int, default=20, help="article i to validation if i %% N == N-1")
    args = parser.parse_args(argv)

    if not Path(args.dump).is_file():
        return refuse("build-corpus", FileNotFoundError(f"dump {args.dump} not found"))
    if args.validation_every < 2:
        return refuse("build-corpus", ValueError(f"--validation-every {args.validation_every}: must be at least 2"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paragraphs: dict[str, list[str]] = {"train": [], "validation": []}
    articles = Counter()
    for i, (_, wikitext) in enumerate(iter_articles(args.dump)):
        split = "validation" if i % args.validation_every == args.validation_every - 1 else "train"
        paragraphs[split] += wikitext_to_paragraphs(wikitext)
        articles[split] += 1
    for split, lines in paragraphs.items():
        path = out / f"{split}.txt"
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        print(f"{path}: {articles[split]} articles, {len(lines)} paragraphs, {path.stat().st_size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
