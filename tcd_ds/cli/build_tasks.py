"""Regenerate the bundled downstream data (tcd_ds/bundled/tasks/) from the VADER ground-truth files (Hutto &
Gilbert 2014).

    tcd-ds build-tasks RAW_DIR --out tcd_ds/bundled/tasks

- movie_reviews/{train,dev,test}.tsv: sentences rated >= +0.5 are positive (1), <= -0.5 negative (0), the rest
  dropped; sentence id % 10 == 0 goes to test, == 1 to dev, the rest to train (the file is sorted by rating,
  so a split by position would not be balanced).
- nyt_editorials/sentences.txt: every NYT editorial sentence, one per line (out-of-domain MLM probe).
"""

import argparse
import sys
from pathlib import Path

from tcd_ds.cli.common import refuse

MOVIES, NYT = "movieReviewSnippets_GroundTruth.txt", "nytEditorialSnippets_GroundTruth.txt"
POSITIVE, NEGATIVE = 0.5, -0.5


def read_ground_truth(path: Path) -> list[tuple[str, float, str]]:
    """`id <tab> mean rating <tab> sentence` lines (CRLF) -> (id, rating, sentence)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            sentence_id, rating, text = line.split("\t")
            rows.append((sentence_id, float(rating), text.strip()))
    return rows


def sentiment_split(sentence_id: str) -> str:
    return {0: "test", 1: "dev"}.get(int(sentence_id) % 10, "train")


def write_movie_reviews(rows: list[tuple[str, float, str]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[str]] = {"train": [], "dev": [], "test": []}
    for sentence_id, rating, text in rows:
        if NEGATIVE < rating < POSITIVE:
            continue
        splits[sentiment_split(sentence_id)].append(f"{text}\t{int(rating >= POSITIVE)}\n")
    for split, lines in splits.items():
        (out / f"{split}.tsv").write_text("sentence\tlabel\n" + "".join(lines), encoding="utf-8")
        positive = sum(line.endswith("\t1\n") for line in lines)
        print(f"{out / split}.tsv: {len(lines)} sentences, {positive} positive")


def write_sentences(rows: list[tuple[str, float, str]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "sentences.txt"
    path.write_text("".join(text + "\n" for _, _, text in rows), encoding="utf-8")
    print(f"{path}: {len(rows)} sentences")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tcd-ds build-tasks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("raw", help="folder holding the two *_GroundTruth.txt files (shared/data/raw)")
    parser.add_argument("--out", required=True, help="where to write (the bundled copy is tcd_ds/bundled/tasks)")
    args = parser.parse_args(argv)
    raw, out = Path(args.raw), Path(args.out)
    missing = [name for name in (MOVIES, NYT) if not (raw / name).is_file()]
    if missing:
        return refuse("build-tasks", FileNotFoundError(f"{raw}: no {' or '.join(missing)}"))
    write_movie_reviews(read_ground_truth(raw / MOVIES), out / "movie_reviews")
    write_sentences(read_ground_truth(raw / NYT), out / "nyt_editorials")
    return 0


if __name__ == "__main__":
    sys.exit(main())
