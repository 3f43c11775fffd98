"""The one way our errors read: ``<subject>: expected <what>, found <what>``.

Every error a user sees (a rejects table row, an HTTP 4xx body, a manifest or teacher-response error)
is a ``Mismatch``: it carries ``subject``, ``expected`` and ``found`` as fields and its text is made here,
once. A caller that re-raises one about another subject (a video's reason, said of a sample's field or a
request's part) passes the fields on with ``about``; it never prefixes a ready-made sentence, which is how
"expected expected ..." came about. ``found`` is our own words, never a library's message (those carry
host paths, timestamps and decoder logs)."""

from __future__ import annotations


def mismatch(subject: str, expected: str, found: str) -> str:
    return f"{subject}: expected {expected}, found {found}"


def sample_field(sample_id: str, field_name: str) -> str:
    """The subject of a sample's error: its id and the field at fault."""
    return f"sample {sample_id!r}, field {field_name!r}"


class Mismatch(ValueError):
    """What was expected of ``subject`` against what was found."""

    def __init__(self, subject: str, expected: str, found: str):
        self.subject, self.expected, self.found = subject, expected, found
        super().__init__(mismatch(subject, expected, found))

    @property
    def message(self) -> str:
        return str(self)

    def about(self, subject: str) -> tuple[str, str, str]:
        """The same mismatch said of another subject: (subject, expected, found)."""
        return subject, self.expected, self.found
