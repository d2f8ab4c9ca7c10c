"""Site: where in the user's code something happened (``file:line``), and how to find it.

Every recorded node carries the site of the line that recorded it, so that an error raised
anywhere later (during replay, on a server) can quote the user's own line. :func:`here` walks
up the stack past lazytensor's and torch's own frames to the first frame of user code.

A site is captured on every recorded op, so capturing is kept cheap: it holds the frame's code
object and instruction offset, and works out the file and line only when they are asked for
(an error message, a warning).
"""

from __future__ import annotations

import linecache
import os
import sys
from types import CodeType, FrameType
from typing import Any

#: The lazytensor package folder: frames of its code are never the user's line.
_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


class Site(tuple):
    """Where the user's code recorded a node: ``file:line``.

    ``Site(file, line)``, or :meth:`at` a code object's instruction offset (what recording
    captures: the line is looked up only when read). Equal sites name the same file and line.
    (A tuple: the cheapest immutable record to make, one per recorded op.)
    """

    __slots__ = ()

    def __new__(cls, file: str, line: int) -> Site:
        return _tuple_new(cls, (file, line))

    @classmethod
    def at(cls, code: CodeType, offset: int) -> Site:
        """The site of instruction ``offset`` (a frame's ``f_lasti``) of ``code``."""
        return _tuple_new(cls, (code, offset))

    @property
    def file(self) -> str:
        where = self[0]
        return where if type(where) is str else where.co_filename

    @property
    def line(self) -> int:
        where, at = self
        if type(where) is str:
            return at
        found = next((line for start, end, line in where.co_lines() if start <= at < end), None)
        return where.co_firstlineno if found is None else found

    def source(self) -> str:
        return linecache.getline(self.file, self.line).strip()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Site):
            return NotImplemented
        return self.file == other.file and self.line == other.line

    def __ne__(self, other: object) -> bool:  # tuple's own would compare the raw items
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __hash__(self) -> int:
        return hash((self.file, self.line))

    def __repr__(self) -> str:
        return f"Site(file={self.file!r}, line={self.line!r})"

    def __str__(self) -> str:
        text = self.source()
        where = f"{self.file}:{self.line}"
        return f'{where} "{text}"' if text else where

    def __reduce__(self) -> tuple:
        return (Site, (self.file, self.line))


_tuple_new = tuple.__new__


def here() -> Site | None:
    """The innermost frame outside lazytensor and torch: the user's line."""
    frame = user_frame()
    if frame is None:
        return None
    return _tuple_new(Site, (frame.f_code, frame.f_lasti))  # Site.at(...), faster


def at(frame: FrameType) -> Site | None:
    """:func:`here`, for a caller that knows ``frame`` is most likely the user's (an operator
    on a proxy, called from the user's line): one lookup instead of a walk of the stack."""
    if _INTERNAL.get(frame.f_code.co_filename) is False:
        return _tuple_new(Site, (frame.f_code, frame.f_lasti))
    found = _outside(frame)
    return None if found is None else _tuple_new(Site, (found.f_code, found.f_lasti))


def user_frame() -> FrameType | None:
    """The innermost frame of the stack outside lazytensor, torch and ``contextlib``."""
    return _outside(sys._getframe(1))


def _outside(frame: FrameType | None) -> FrameType | None:
    """``frame`` or the first frame below it outside lazytensor, torch and ``contextlib``."""
    internal = _INTERNAL
    while frame is not None:
        file = frame.f_code.co_filename  # a str: its hash is cached (a code object's is not)
        inside = internal.get(file)
        if inside is None:
            inside = internal[file] = _is_internal(file)
        if not inside:
            return frame
        frame = frame.f_back
    return None


#: File name -> whether its frames belong to lazytensor/torch (skipped when naming a line).
_INTERNAL: dict[Any, bool] = {}


def _is_internal(file: str) -> bool:
    torch = sys.modules.get("torch")  # a trace has imported it; this module need not
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep if torch else "\0"
    return (
        file.startswith(_HERE)
        or file.startswith(torch_dir)
        or file.startswith("<frozen")
        or file.endswith("contextlib.py")
    )
