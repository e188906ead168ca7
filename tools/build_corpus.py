"""Regenerate the bundled corpus data/wiki/{train,validation}.txt from a MediaWiki XML dump.

    python tools/build_corpus.py [DUMP.xml.bz2] [--out data/wiki] [--validation-every 20]
"""

import argparse
from collections import Counter
from pathlib import Path

from tcd_ds.data.wikitext import iter_articles, wikitext_to_paragraphs

DEFAULT_DUMP = "/work/shared/data/raw/enwiki-sample.xml.bz2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dump", nargs="?", default=DEFAULT_DUMP, help="MediaWiki pages-articles .xml.bz2")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "data" / "wiki"))
    parser.add_argument("--validation-every", type=int, default=20, help="article i to validation if i %% N == N-1")
    args = parser.parse_args()

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

if __name__ == "__main__":
    main()
