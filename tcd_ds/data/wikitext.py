"""MediaWiki dump -> prose paragraphs, with the standard library only.

Good enough for an MLM corpus, not a full wikitext parser: markup that rarely carries prose (templates,
tables, references, formulas, file captions) is dropped rather than rendered.
"""

import bz2
import html
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

MIN_PARAGRAPH_CHARS = 40

# Sections after which an article holds lists of links and citations, not prose.
_END_SECTIONS = {
    "see also", "references", "notes", "footnotes", "citations", "sources", "bibliography",
    "further reading", "external links", "notes and references", "references and notes",
}
_DROPPED_LINK_NAMESPACES = {"file", "image", "media", "category"}
_DROPPED_ELEMENTS = (
    "ref|references|math|chem|ce|gallery|imagemap|timeline|score|graph|source|syntaxhighlight|pre|hiero"
)

_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_SELF_CLOSING_ELEMENT = re.compile(rf"<(?:{_DROPPED_ELEMENTS})\b[^>]*/>", re.I)
_ELEMENT_WITH_CONTENT = re.compile(rf"<({_DROPPED_ELEMENTS})\b[^>]*>.*?(?:</\1\s*>|\Z)", re.I | re.S)
_LINE_BREAK_TAG = re.compile(r"<br\s*/?>", re.I)
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_EXTERNAL_LINK = re.compile(r"\[(?:https?:|ftp:|//)[^\s\]]*\s*([^\]]*)\]")
_INTERNAL_LINK = re.compile(r"\[\[((?:(?!\[\[|\]\]).)*)\]\]", re.S)  # innermost: no [[ or ]] inside
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$")
_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_BOLD_ITALIC = re.compile(r"''+")
_LIST_MARKER = re.compile(r"^[*#:;]+\s*")
_EMPTY_PARENS = re.compile(r"\(\s*[,;:]?\s*\)")
_LEADING_PUNCT_IN_PARENS = re.compile(r"\(\s*[,;:]\s*")
_REPEATED_COMMA = re.compile(r",(?:\s*,)+")  # left where a dropped template stood between commas
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?)])")
_SPACE_AFTER_PAREN = re.compile(r"\(\s+")
_SPACES = re.compile(r"\s+")


def iter_articles(xml_bz2: str | Path) -> Iterator[tuple[str, str]]:
    """Yield (title, wikitext) of main-namespace, non-redirect pages, streaming the dump."""
    with bz2.open(xml_bz2) as f:
        for _, elem in ET.iterparse(f):
            if _local(elem.tag) != "page":
                continue
            fields = {_local(child.tag): child for child in elem}
            text = next((e.text for e in elem.iter() if _local(e.tag) == "text"), None) or ""
            redirect = "redirect" in fields or text.lstrip().upper().startswith("#REDIRECT")
            if fields["ns"].text == "0" and not redirect:
                yield fields["title"].text or "", text
            elem.clear()


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def wikitext_to_paragraphs(wikitext: str) -> list[str]:
    """Strip markup and return the article's prose paragraphs, short or letterless ones dropped."""
    text = _COMMENT.sub("", wikitext)
    text = _SELF_CLOSING_ELEMENT.sub("", text)
    text = _ELEMENT_WITH_CONTENT.sub("", text)
    text = _drop_nested(text, "{{", "}}")
    text = _drop_nested(text, "{|", "|}")
    text = _LINE_BREAK_TAG.sub(" ", text)
    text = _TAG.sub("", text)
    text = _EXTERNAL_LINK.sub(r"\1", text)
    text = _replace_links(text)
    text = _MAGIC_WORD.sub("", text)
    text = _BOLD_ITALIC.sub("", text)
    paragraphs, current = [], []
    for line in text.splitlines():
        heading = _HEADING.match(line.strip())
        if heading and heading.group(2).lower() in _END_SECTIONS:
            break
        if heading or not line.strip() or line.startswith(("|", "!")):  # "|", "!": rows of a broken table
            paragraphs.append(" ".join(current))
            current = []
        elif _LIST_MARKER.match(line):  # a list item is a paragraph of its own
            paragraphs += [" ".join(current), _LIST_MARKER.sub("", line)]
            current = []
        else:  # consecutive plain lines form one paragraph, as MediaWiki renders them
            current.append(line)
    paragraphs.append(" ".join(current))
    paragraphs = [_clean_line(html.unescape(p)) for p in paragraphs]
    return [p for p in paragraphs if len(p) >= MIN_PARAGRAPH_CHARS and any(c.isalpha() for c in p)]


def _drop_nested(text: str, opening: str, closing: str) -> str:
    """Remove balanced opening...closing spans; they nest, so a regex cannot match them."""
    kept, depth, start = [], 0, 0
    for m in re.finditer(f"{re.escape(opening)}|{re.escape(closing)}", text):
        if m.group() == opening:
            if depth == 0:
                kept.append(text[start : m.start()])
            depth += 1
        elif depth > 0:
            depth -= 1
            if depth == 0:
                start = m.end()
    if depth == 0:  # an unclosed span runs to the end of the text
        kept.append(text[start:])
    return "".join(kept)


def _replace_links(text: str) -> str:
    """Replace [[target|label]] by its label, innermost first (file captions may hold links)."""
    while True:
        replaced = _INTERNAL_LINK.sub(_link_text, text)
        if replaced == text:
            return replaced
        text = replaced


def _link_text(match: re.Match) -> str:
    target, _, label = match.group(1).partition("|")
    prefix, colon, rest = target.partition(":")
    if colon and prefix.strip().lower() in _DROPPED_LINK_NAMESPACES:
        return ""
    if label:
        return label.rsplit("|", 1)[-1]
    if colon and re.fullmatch(r"[a-z-]+", prefix):  # interwiki or language link: [[wikt:word]]
        return rest
    return target


def _clean_line(line: str) -> str:
    line = _SPACES.sub(" ", line.replace("\xa0", " "))
    line = _EMPTY_PARENS.sub("", line)
    line = _REPEATED_COMMA.sub(",", line)
    line = _LEADING_PUNCT_IN_PARENS.sub("(", line)
    line = _SPACE_AFTER_PAREN.sub("(", line)
    line = _SPACE_BEFORE_PUNCT.sub(r"\1", line)
    return _SPACES.sub(" ", line).strip()
