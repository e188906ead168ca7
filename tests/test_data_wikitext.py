import bz2

from tcd_ds.data.wikitext import iter_articles, wikitext_to_paragraphs


def test_inline_markup_is_reduced_to_text():
    wikitext = (
        "{{Infobox thing|name={{nested|deeply {{very}} }}|x=1}}\n"
        "'''Foo''' is a [[bar (thing)|baz]] thing{{citation needed|date=May 2015}} found in [[Paris]]"
        "<ref name=\"a\">{{cite web|url=http://x.org|title=T}}</ref> and [[Lyon]]s.<ref name=b/> "
        "It was ''very'' old&nbsp;indeed <!-- a hidden\nnote --> and H<sub>2</sub>O was [http://example.org there]."
    )
    assert wikitext_to_paragraphs(wikitext) == [
        "Foo is a baz thing found in Paris and Lyons. It was very old indeed and H2O was there."
    ]


def test_block_markup_is_dropped():
    wikitext = "\n".join([
        "[[File:Cat.jpg|thumb|A cat near [[Paris]] (left) [taken 1990].]]",
        "{| class=\"wikitable\"",
        "|-",
        "| cell one with enough characters to pass the length filter || cell two {{tpl|{|}}",
        "Cell text continued on a line of its own inside the table, long enough.",
        "|}",
        "== History ==",
        "The first paragraph of the history section, long enough to keep.",
        "* A bulleted item that is long enough to be kept as prose text.",
        "# short item",
        "<math>x^2 + y^2 = z^2</math>",
        "12345 67890 12345 67890 12345 67890 12345 67890",
        "[[Category:Things]]",
        "== See also ==",
        "The text after See also is a list of links and is not prose at all.",
    ])
    assert wikitext_to_paragraphs(wikitext) == [
        "The first paragraph of the history section, long enough to keep.",
        "A bulleted item that is long enough to be kept as prose text.",
    ]


def test_consecutive_lines_form_one_paragraph_and_blank_lines_separate():
    wikitext = (
        "A paragraph wrapped over\ntwo source lines, as MediaWiki joins them.\n"
        "\nA second paragraph that stands on its own line."
    )
    assert wikitext_to_paragraphs(wikitext) == [
        "A paragraph wrapped over two source lines, as MediaWiki joins them.",
        "A second paragraph that stands on its own line.",
    ]


def test_dropped_templates_leave_no_empty_parentheses_or_double_commas():
    wikitext = "Anarchism ({{IPA-en|ˈænərkɪzəm}}) is a philosophy, {{lang|la|x}}, held by many across the world."
    assert wikitext_to_paragraphs(wikitext) == ["Anarchism is a philosophy, held by many across the world."]


def test_iter_articles_skips_redirects_and_other_namespaces(tmp_path):
    page = (
        "<page><title>{t}</title><ns>{ns}</ns><id>1</id>{extra}"
        "<revision><text xml:space=\"preserve\">{text}</text></revision></page>"
    )
    xml = (
        '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">'
        + page.format(t="Redirected", ns=0, extra='<redirect title="Target" />', text="#REDIRECT [[Target]]")
        + page.format(t="Wikipedia:About", ns=4, extra="", text="Project page text.")
        + page.format(t="Alpha", ns=0, extra="", text="'''Alpha''' is the first letter &amp;amp; more.")
        + "</mediawiki>"
    )
    dump = tmp_path / "dump.xml.bz2"
    dump.write_bytes(bz2.compress(xml.encode()))
    assert list(iter_articles(dump)) == [("Alpha", "'''Alpha''' is the first letter &amp; more.")]
