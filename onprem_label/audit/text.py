"""Escaping audit values for text output, so one value can never pass for two lines or a command."""

from __future__ import annotations

import re

# C0 and C1 controls, DEL, line/paragraph separators and bidi overrides, which reorder what a
# reader sees (CVE-2021-42574 style); the backslash too, so an escape cannot be faked.
_UNSAFE = re.compile("[\\\\\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\\": "\\\\", "\r": "\\r", "\n": "\\n", "\t": "\\t"}


def _escape(match: re.Match) -> str:
    ch = match.group()
    if ch in _NAMED:
        return _NAMED[ch]
    return f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}"


def escape_text(value: object) -> str:
    """`value` as one printable line: CR, LF, tab and control characters written as escapes."""
    return _UNSAFE.sub(_escape, str(value))
