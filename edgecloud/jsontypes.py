"""Strict JSON scalars for the typed models that parse what other programs write (releases, model
cards): a string is a string and an integer an integer (no ``"4"`` for 4, no ``true`` for 1), and a
number is an integer or a float, never a boolean (JSON does not tell 1 from 1.0: RFC 8785 writes 1.0
as 1)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Strict

Str = Annotated[str, Strict()]
Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
Number = Annotated[float, Strict()]
