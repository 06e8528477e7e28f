"""Why a file was not imported: one exception with a stable code and a sentence for people."""

from __future__ import annotations


class Rejected(Exception):
    """A file that cannot become an item; `code` is stable for clients, `reason` is for people.

    Reasons name the problem (a transfer syntax's name, a limit) and never quote a value read
    from the file: a rejected file was not de-identified.
    """

    def __init__(self, code: str, reason: str):
        super().__init__(code, reason)  # both in args, so it pickles across worker processes
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


# The codes, for clients that sort rejections.
NOT_AN_IMAGE = "not_an_image"
UNSUPPORTED_FORMAT = "unsupported_format"
NO_PIXEL_DATA = "no_pixel_data"
UNSUPPORTED_SYNTAX = "unsupported_syntax"
TRUNCATED = "truncated"
CORRUPT = "corrupt"
TOO_LARGE = "too_large"
TOO_MANY_PIXELS = "too_many_pixels"
INCOMPATIBLE = "incompatible"
UNREADABLE = "unreadable"  # the path does not exist or cannot be read (not a fault of the file)
