"""One error hierarchy: every star_hf error is a StarError and the builtin exception it means."""

from __future__ import annotations

import inspect

import pytest

import star_hf
from star_hf import errors

BUILTIN = {
    "NoRouterError": ValueError,
    "NotPatchedError": ValueError,
    "UnsupportedRouterError": ValueError,
    "BrokenUpstreamError": ValueError,
    "AlreadyPatchedError": ValueError,
    "AdapterMismatchError": ValueError,
    "CorruptFileError": ValueError,
    "HubUploadError": RuntimeError,
    "AdaptationActiveError": RuntimeError,
}


def test_every_error_is_a_star_error_and_its_builtin():
    classes = {n: c for n, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, Exception)}
    assert set(classes) - {"StarError"} == set(BUILTIN)
    for name, builtin in BUILTIN.items():
        assert issubclass(classes[name], errors.StarError) and issubclass(classes[name], builtin), name
        assert getattr(star_hf, name) is classes[name]


def test_no_router_and_not_patched_are_different_errors(mixtral):
    import torch.nn as nn

    with pytest.raises(errors.NoRouterError):
        star_hf.patch_model(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(errors.NotPatchedError):
        star_hf.fold(mixtral)
    assert not issubclass(errors.NotPatchedError, errors.NoRouterError)
