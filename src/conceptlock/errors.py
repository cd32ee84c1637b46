"""The one user-facing error type (kept dependency-free so any module can import it)."""


class ConceptlockError(ValueError):
    """A user-facing error: one line, naming the file or field at fault."""
