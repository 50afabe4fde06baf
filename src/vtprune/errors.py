"""Errors raised by vtprune. Each message says what went wrong and what to do about it."""


class VTPruneError(Exception):
    """Base class of every error vtprune raises on purpose."""


class ArgumentError(VTPruneError, ValueError, TypeError):
    """An argument of ``apply()`` or of a method that is misspelt, of the wrong type or out of range.
    Raised by ``apply()`` (or the method's constructor) before the model is touched."""


class AlreadyPrunedError(VTPruneError, RuntimeError):
    """``apply()`` on a model that is already pruned."""


class BudgetError(VTPruneError, ValueError):
    """A keep/ratio budget that cannot be met (≤ 0, or not below the number of visual tokens)."""


class UnsupportedModelError(VTPruneError, TypeError):
    """The model class has no adapter."""


class UnsupportedMethodError(VTPruneError, ValueError):
    """The method needs something this model family cannot provide (insertion point, CLS token, ...)."""


class UnknownMethodError(VTPruneError, KeyError):
    """No method is registered under that name."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


class InputError(VTPruneError, ValueError):
    """The inputs handed to the model do not fit together (images vs placeholders, dtype, device)."""


class UnboundMethodError(VTPruneError, RuntimeError):
    """A method ran on a model it was not bound to: ``vtprune.apply`` binds it (``method.bind``) and
    loads its resources (``load_resources``) before the model runs; code driving an adapter by hand
    must do the same."""
