"""Error types. Every user-facing error names the problem and the fix."""


class QLoRADSError(ValueError):
    """Bad input or an inconsistent file/config: the message says what and how to fix it."""


class OpBuildError(RuntimeError):
    """A compiled op could not be built or loaded; callers fall back to the torch reference."""
