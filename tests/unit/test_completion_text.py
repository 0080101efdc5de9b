"""Editor completion post-processing: where a completion stops and what it may show while streaming."""
from ember.server.completion_text import CompletionTrimmer


def test_trailing_whitespace_is_held_back_then_trimmed():
    t = CompletionTrimmer()
    assert t.feed("x = 1  \n", is_final=False) == (5, False)
    assert t.feed("x = 1  \ny", is_final=False) == (9, False)
    assert t.feed("x = 1  \n\n", is_final=True) == (5, True)


def test_tail_that_retypes_the_suffix_head_is_cut():
    t = CompletionTrimmer(suffix=")\n    return x\n")
    assert t.feed("a, b)", is_final=True) == (4, True)
    assert t.feed("a, b)", is_final=False) == (4, False)  # held back while it could be the suffix
    assert t.feed("a, b", is_final=False) == (4, False)
    assert t.feed("a, b) + c", is_final=True) == (9, True)  # not at the end: kept
    assert t.feed(")", is_final=True) == (1, True)  # the whole line is the head: a FIM model may mean it


def test_prefix_only_stops_at_the_suffix_first_line():
    t = CompletionTrimmer(suffix="\n\nprint(total)\n", stop_at_suffix_line=True)
    assert t.feed("total = a + b\nprint(total)\n", is_final=False) == (13, True)
    assert t.feed("total = a + b\nprint(to", is_final=False) == (13, False)  # may become the suffix line
    assert t.feed("total = a + b\nprint(x)\n", is_final=False) == (22, False)
    assert t.feed("total = a + b\nprint(total)", is_final=True) == (13, True)
    fim = CompletionTrimmer(suffix="\n\nprint(total)\n")  # a model that saw the suffix keeps the line
    assert fim.feed("total = a + b\nprint(total)\n", is_final=False) == (26, False)


def test_n_indent_ends_the_block():
    t = CompletionTrimmer(n_indent=4)
    assert t.feed("x = 1\n    y = 2\n", is_final=False) == (15, False)
    assert t.feed("x = 1\n    y = 2\nz = 3", is_final=False) == (15, True)
    assert t.feed("x = 1\n    y = 2\n\n  ", is_final=False) == (15, False)  # blank lines do not count


def test_single_line_stops_at_the_first_line_with_text():
    t = CompletionTrimmer(single_line=True)
    assert t.feed("\n    x = 1\n    y", is_final=False) == (10, True)
    assert t.feed("foo(bar)", is_final=False) == (8, False)
    assert t.feed("foo(bar)\nbaz", is_final=False) == (8, True)
