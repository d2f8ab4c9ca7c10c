"""Site: where in the user's code something happened (``file:line``), and how to find it.

Every recorded node carries the site of the line that recorded it, so that an error raised
anywhere later (during replay, on a server) can quote the user's own line. :func:`here` walks
up the stack past lazytensor's and torch's own frames to the first frame of user code.
"""

from __future__ import annotations

import linecache
import os
import sys
from types import FrameType
from typing import Any, NamedTuple

#: The lazytensor package folder: frames of its code are never the user's line.
_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


class Site(NamedTuple):
    """Where the user's code recorded a node: ``file:line``. (A named tuple: one is made for
    every recorded op, and a tuple is the cheapest immutable record to make.)"""

    file: str
    line: int

    def source(self) -> str:
        return linecache.getline(self.file, self.line).strip()

    def __str__(self) -> str:
        text = self.source()
        where = f"{self.file}:{self.line}"
        return f'{where} "{text}"' if text else where


def here() -> Site | None:
    """The innermost frame outside lazytensor and torch: the user's line."""
    frame = user_frame()
    if frame is None:
        return None
    return _tuple_new(Site, (frame.f_code.co_filename, frame.f_lineno))  # Site(...), faster


_tuple_new = tuple.__new__


def user_frame() -> FrameType | None:
    """The innermost frame of the stack outside lazytensor, torch and ``contextlib``."""
    frame = sys._getframe(1)
    internal = _INTERNAL
    while frame is not None:
        code = frame.f_code
        inside = internal.get(code)
        if inside is None:
            inside = internal[code] = _is_internal(code.co_filename)
        if not inside:
            return frame
        frame = frame.f_back
    return None


#: Code object -> whether its frames belong to lazytensor/torch (skipped when naming a line).
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
