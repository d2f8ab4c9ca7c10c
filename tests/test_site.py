"""Tests for lazytensor/core/site.py: the user's line, captured cheaply and read when needed."""

from __future__ import annotations

import copy
import pickle
import sys

from lazytensor.core import site, tree
from lazytensor.core.site import Site


def captured() -> Site:
    """What recording captures for its caller's line: a code object and an offset."""
    frame = sys._getframe(1)
    return Site.at(frame.f_code, frame.f_lasti)


def test_a_captured_site_reads_as_its_file_and_line() -> None:
    line = sys._getframe().f_lineno + 1
    got = captured()
    assert (got.file, got.line) == (__file__, line)
    assert got == Site(__file__, line) and hash(got) == hash(Site(__file__, line))
    assert str(got) == f'{__file__}:{line} "got = captured()"'
    assert got != Site(__file__, line + 1) and got != (__file__, line)


def test_a_captured_site_names_the_line_of_a_multi_line_statement() -> None:
    first = sys._getframe().f_lineno + 1
    got = [
        captured(),
        captured(),
    ]
    assert [s.line for s in got] == [first + 1, first + 2]


def test_a_captured_site_copies_and_pickles_as_file_and_line() -> None:
    got = captured()
    assert pickle.loads(pickle.dumps(got)) == got == copy.deepcopy(got)
    assert pickle.loads(pickle.dumps(got))[0] == __file__  # the code object stays here


def test_here_and_at_name_the_line_of_user_code() -> None:
    line = sys._getframe().f_lineno + 1
    found = site.here(), site.at(sys._getframe())
    assert [(s.file, s.line) for s in found] == [(__file__, line)] * 2


def first_here() -> Site:
    return site.at(sys._getframe())


def second_here() -> Site:  # the same code as first_here: its sites sit at the same offset
    return site.at(sys._getframe())


def test_a_line_recorded_again_has_the_same_site_and_others_their_own() -> None:
    lines = [first_here.__code__.co_firstlineno + 1, second_here.__code__.co_firstlineno + 1]
    for _ in range(2):
        got = [first_here(), second_here()]
        assert [(s.file, s.line) for s in got] == [(__file__, line) for line in lines]
    assert first_here() is first_here()  # made once, while the line keeps recording


def test_at_a_frame_of_lazytensor_names_the_user_line_below_it() -> None:
    line = sys._getframe().f_lineno + 1
    [found] = tree.map(lambda leaf: site.at(sys._getframe(1)), [0])  # frame 1: tree.map's
    assert (found.file, found.line) == (__file__, line)
