"""Market symbols: how a symbol is written (BASE/QUOTE in upper case, like BTC/USDT)."""

from __future__ import annotations

import re

from shared.errors import InvalidArgument

SYMBOL_RE = re.compile(r"[A-Z0-9]{1,20}/[A-Z0-9]{1,20}")


def validate_symbol(symbol: str) -> str:
    """The symbol unchanged if it looks like BASE/QUOTE in upper case (BTC/USDT); InvalidArgument otherwise."""
    if not isinstance(symbol, str) or not SYMBOL_RE.fullmatch(symbol):
        raise InvalidArgument(
            f"symbol {symbol!r} is not valid; expected BASE/QUOTE in upper-case letters and digits, like BTC/USDT",
            field="symbol",
        )
    return symbol
