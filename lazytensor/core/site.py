"""Site: where in the user's code something happened (``file:line``), and how to find it.

Every recorded node carries the site of the line that recorded it, so that an error raised
anywhere later (during replay, on a server) can quote the user's own line. :func:`here` walks
up the stack past lazytensor's and torch's own frames to the first frame of user code.

A site is captured on every recorded op, so capturing is kept cheap: it holds the frame's code
object and instruction offset, and works out the file and line only when they are asked for
(an error message, a warning); a line that records again (a loop) reuses its site (:data:`KNOWN`).
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
    return at(_getframe(1))


def at(frame: FrameType) -> Site | None:
    """The site of ``frame``, or of the first frame below it outside lazytensor and torch:
    :func:`here` for a caller that has ``frame`` at hand (an operator on a proxy has the user's
    line itself, so it is one lookup instead of a walk of the stack).

    A loop records the same few lines again and again, so their sites are kept by offset
    (:data:`KNOWN`) and made once."""
    code = frame.f_code
    inside = _INTERNAL.get(code.co_filename)
    while inside is not False:  # _outside(frame), inline: a recorded op walks one or two
        if inside is None:
            inside = _INTERNAL[code.co_filename] = _is_internal(code.co_filename)
            continue
        frame = frame.f_back
        if frame is None:
            return None
        code = frame.f_code
        inside = _INTERNAL.get(code.co_filename)
    offset = frame.f_lasti
    known = KNOWN.get(offset)
    if known is not None and known[0] is code:
        return known
    made = KNOWN[offset] = _tuple_new(Site, (code, offset))  # Site.at(code, offset), faster
    return made


#: Instruction offset -> the site :func:`at` last made for it, in whichever code object: at
#: most one per offset, so it stays as small as the longest code that recorded. A hit is
#: ``frame``'s site only if its code is ``frame``'s: ``site[0] is frame.f_code`` (a hot path
#: may check that itself and call :func:`at` on a miss).
KNOWN: dict[int, Site] = {}
_getframe = sys._getframe


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
