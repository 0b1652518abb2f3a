"""Error types. Every user-facing error names the problem and the fix."""


class QLoRADSError(ValueError):
    """Bad input or an inconsistent file/config: the message says what and how to fix it."""


class OpBuildError(RuntimeError):
    """A compiled op could not be built or loaded; callers fall back to the torch reference."""


class NonFiniteError(FloatingPointError):
    """A NaN/Inf appeared in a forward pass (raised by ``qlora_ds.nn.guards`` in debug mode).

    A ``FloatingPointError`` rather than a ``QLoRADSError``: it is a numerical fault of a run (a
    diverged adapter, a bad learning rate, an fp16 overflow), not bad input or a bad config, so a
    training loop can catch it to skip a step without also swallowing configuration errors (which
    must abort), and ``except FloatingPointError`` catches it as it catches numpy's
    ``errstate(all="raise")`` errors.

    Attributes: ``module`` (full path of the first module that produced the value), ``what``
    ('dequantized weight' | 'LoRA output' | 'layer output' | 'output'), ``nan``, ``inf`` (counts),
    ``numel`` and ``input_finite`` (whether that module's input was still finite; None if unknown).
    """

    def __init__(self, message: str, module: str = "", what: str = "", nan: int = 0, inf: int = 0,
                 numel: int = 0, input_finite: bool | None = None):
        super().__init__(message)
        self.module, self.what, self.nan, self.inf = module, what, nan, inf
        self.numel, self.input_finite = numel, input_finite
