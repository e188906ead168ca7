import shutil

import pytest

from tcd_ds.data.cache import build_once
from tcd_ds.data.text import TextLines, expand_paths, fingerprint


def _tree(root):
    (root / "b").mkdir(parents=True)
    (root / "b" / "z.txt").write_text("z\n")
    (root / "a.txt").write_text("a\n")
    (root / "b" / "notes.md").write_text("not text corpus\n")
    (root / "c.txt").write_text("c\n")
    return root


def test_expand_paths_keeps_argument_order_and_sorts_directories(tmp_path):
    root = _tree(tmp_path / "corpus")
    extra = tmp_path / "extra.dat"
    extra.write_text("named files are taken whatever their suffix\n")
    assert expand_paths([str(extra), str(root)]) == [extra, root / "a.txt", root / "b" / "z.txt", root / "c.txt"]


def test_expand_paths_names_a_missing_path(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        expand_paths([str(missing)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        expand_paths([str(tmp_path / "empty")])


def test_lines_are_stripped_and_bad_utf8_lines_skipped_and_counted(tmp_path):
    f = tmp_path / "mixed.txt"
    f.write_bytes(b"  first line \n\n\xff\xfe broken\r\ncaf\xc3\xa9 ok\r\nlatin-1 caf\xe9\n   \nlast")
    lines = TextLines([f])
    assert list(lines) == ["first line", "café ok", "last"]
    assert (lines.lines, lines.skipped) == (3, 2)


def test_fingerprint_follows_content_and_names_not_location(tmp_path):
    root = _tree(tmp_path / "corpus")
    before = fingerprint(expand_paths([root]))
    moved = tmp_path / "elsewhere" / "corpus2"
    shutil.copytree(root, moved)
    assert fingerprint(expand_paths([moved])) == before

    (moved / "b" / "z.txt").write_text("Z\n")
    assert fingerprint(expand_paths([moved])) != before

    shutil.rmtree(moved)
    shutil.copytree(root, moved)
    (moved / "c.txt").rename(moved / "d.txt")
    assert fingerprint(expand_paths([moved])) != before


def test_build_once_loser_of_a_race_uses_the_winners_folder(tmp_path):
    final = tmp_path / "cache" / "key"

    def winner(out):
        (out / "who").write_text("winner")

    def loser(out):
        (out / "who").write_text("loser")
        build_once(final, winner)  # another rank publishes while this one is still building

    assert build_once(final, loser) == final
    assert (final / "who").read_text() == "winner"
    assert [p.name for p in final.parent.iterdir()] == ["key"]  # no temporary folders left behind

    assert build_once(final, lambda out: pytest.fail("a cache hit must not rebuild")) == final
