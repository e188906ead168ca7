"""Regenerate the bundled downstream data in data/tasks/ from the VADER ground-truth files (Hutto & Gilbert 2014).

    python tools/build_tasks.py [RAW_DIR] [--out data/tasks]

- movie_reviews/{train,dev,test}.tsv: sentences rated >= +0.5 are positive (1), <= -0.5 negative (0), the rest
  dropped; sentence id % 10 == 0 goes to test, == 1 to dev, the rest to train (the file is sorted by rating,
  so a split by position would not be balanced).
- nyt_editorials/sentences.txt: every NYT editorial sentence, one per line (out-of-domain MLM probe).
"""

import argparse
from pathlib import Path

DEFAULT_RAW = "/work/shared/data/raw"
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("raw", nargs="?", default=DEFAULT_RAW, help="folder holding the two *_GroundTruth.txt files")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "data" / "tasks"))
    args = parser.parse_args()
    raw, out = Path(args.raw), Path(args.out)
    write_movie_reviews(read_ground_truth(raw / MOVIES), out / "movie_reviews")
    write_sentences(read_ground_truth(raw / NYT), out / "nyt_editorials")


if __name__ == "__main__":
    main()
