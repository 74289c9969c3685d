"""Error types. Every user-facing failure is a DeltapackError with a one-line message; the CLI prints it and exits 2."""


class DeltapackError(Exception):
    """Base class: a clear, one-line, user-facing error."""


class InputError(DeltapackError):
    """A model/checkpoint input cannot be read or is not what it claims to be."""


class MismatchError(DeltapackError):
    """Base and fine-tune (or delta and base) do not belong together."""


class FormatError(DeltapackError):
    """A delta directory is malformed, truncated or corrupted."""


class BudgetError(DeltapackError):
    """The requested ratio cannot be met by the method."""


class MethodError(DeltapackError):
    """Unknown method or invalid method parameters."""
