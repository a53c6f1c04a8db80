"""mypyc's class options (`mypyc_attr`), for the modules the compiled build compiles.

Owns: the decorator's name. mypyc reads it at compile time from `mypy_extensions`, which neither
the pure build nor the image carries at run time: there it is a decorator that changes nothing.
Must never: import anything of ours.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mypy_extensions import mypyc_attr
else:

    def mypyc_attr(*_args: object, **_options: object):
        return lambda cls: cls


__all__ = ["mypyc_attr"]
