"""Errors carry their status: every reason the proxy gives is a type in proxy/errors.py with a 4xx or 5xx of its
own, chosen on purpose (not inherited by accident), and the edge answers with it."""

from __future__ import annotations

import importlib
import pkgutil

import proxy
from proxy import errors


def _all_subclasses(cls: type) -> set[type]:
    return {sub for direct in cls.__subclasses__() for sub in {direct, *_all_subclasses(direct)}}


def _every_error_type() -> set[type]:
    """Every ProxyError subclass in the package, wherever it is defined: each module is imported first."""
    for module in pkgutil.walk_packages(proxy.__path__, "proxy."):
        if not module.name.startswith("proxy.testing") and not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    return _all_subclasses(errors.ProxyError)


def test_every_error_type_lives_in_errors_and_says_its_status() -> None:
    every = _every_error_type()
    assert len(every) > 20
    elsewhere = sorted(f"{cls.__module__}.{cls.__name__}" for cls in every if cls.__module__ != "proxy.errors")
    assert not elsewhere, f"move these into proxy/errors.py: {elsewhere}"
    unset = sorted(cls.__name__ for cls in every if "status" not in vars(cls))
    assert not unset, f"give these a status of their own (class attribute `status`): {unset}"
    wrong = sorted(f"{cls.__name__}={cls.status}" for cls in every if not 400 <= cls.status < 600)  # type: ignore[attr-defined]
    assert not wrong


def test_the_base_is_a_502_and_the_401_is_access_controls_alone() -> None:
    """git prompts for a password on a 401: only access control's refusals (AuthenticationRequired) give one."""
    assert errors.ProxyError.status == 502
    given_401 = {cls for cls in _every_error_type() if cls.status == 401}  # type: ignore[attr-defined]
    assert errors.AuthenticationRequired in given_401
    assert all(issubclass(cls, errors.AuthenticationRequired) for cls in given_401)
