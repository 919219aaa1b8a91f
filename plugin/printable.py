r"""Text that is safe to put in a log line or an ``Err``: one line, no terminal control.

File names are bytes.  Python holds the ones that are not UTF-8 as
``surrogateescape`` str (``os.fsdecode``), which a UTF-8 stream refuses to
write (the record is lost with a "Logging error" traceback) or, with
``backslashreplace``, writes as ``\udce9`` where the byte was ``\xe9``.  And a
name may hold a newline (a forged log line), an escape sequence (a rewritten
terminal) or a right-to-left override.  :func:`printable` shows each such
character as an escape, the way ``repr`` does, and a byte that was not UTF-8
as ``\xNN``: the operator reads which bytes the name had.  Printable text,
emoji and combining marks (NFD) are left as they are.
"""

from __future__ import annotations

import logging


def _escape(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # the byte surrogateescape kept
        return f"\\x{code - 0xDC00:02x}"
    return repr(char)[1:-1]  # \n, \t, \x1b, \u202e, \U000e0001, ...


def printable(text: str) -> str:
    """``text`` with every non-printable character escaped (one line, valid UTF-8)."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escape(char) for char in text)


def printable_lines(text: str) -> str:
    """:func:`printable` per line, keeping the line breaks (a traceback)."""
    return "\n".join(printable(line) for line in text.split("\n"))


class PrintableFormatter(logging.Formatter):
    """A formatter whose every record is one printable line (its traceback, several).

    The message is escaped after ``%`` formatting, so whatever an argument held
    (a path, an ``Err``, a layer id) cannot break the line or the stream's encoding.
    """

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_text:  # cached by another handler's formatter, unescaped
            record.exc_text = printable_lines(record.exc_text)
        return super().format(record)

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: logging._SysExcInfoType) -> str:
        return printable_lines(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return printable_lines(super().formatStack(stack_info))
