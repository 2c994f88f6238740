"""star_hf's errors: one base class, and each error also the builtin exception it means.

``except star_hf.StarError`` catches everything star_hf raises on purpose; ``except ValueError`` (or
``OSError``, ``RuntimeError``) keeps catching what it caught before the hierarchy existed.
"""

from __future__ import annotations

__all__ = [
    "AdaptationActiveError",
    "AdapterMismatchError",
    "AlreadyPatchedError",
    "BrokenUpstreamError",
    "CorruptFileError",
    "HubUploadError",
    "NoRouterError",
    "NotPatchedError",
    "StarError",
    "UnsupportedRouterError",
]


class StarError(Exception):
    """Base class of every error star_hf raises on purpose."""


class NoRouterError(StarError, ValueError):
    """The model has no MoE router star_hf could patch (not a mixture-of-experts model, or none selected)."""


class NotPatchedError(StarError, ValueError):
    """The call needs STAR routers and the model has none: call ``star_hf.patch_model`` first."""


class UnsupportedRouterError(StarError, ValueError):
    """A router is not a linear gate, or its architecture is not verified."""


class BrokenUpstreamError(UnsupportedRouterError):
    """The stock model itself fails in the installed Transformers (``patching.architectures.UPSTREAM_FAILURES``)."""


class AlreadyPatchedError(StarError, ValueError):
    """``patch_model`` was called on a model that already has STAR routers."""


class AdapterMismatchError(StarError, ValueError):
    """A STAR adapter does not fit the model it is loaded into."""


class CorruptFileError(StarError, ValueError):
    """A file star_hf reads is missing, truncated, or holds values it cannot accept."""


class HubUploadError(StarError, RuntimeError):
    """An upload to the Hugging Face Hub failed; nothing local was changed."""


class AdaptationActiveError(StarError, RuntimeError):
    """Test-time adaptation is already enabled on the model (adaptation does not nest)."""
