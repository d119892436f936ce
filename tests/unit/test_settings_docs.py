"""Every MLSIGNAL_* variable is documented once in shared/settings.py, with its default, and the README's
configuration table says the same."""

from __future__ import annotations

import re
from pathlib import Path

import shared.settings as settings_module
from shared.settings import Settings, known_variables

README = Path(__file__).resolve().parents[2] / "README.md"
UNSET = ("(none)", "\N{EN DASH}")  # how the two tables write "no default"
ROW = re.compile(r"^\|\s*`?(MLSIGNAL_[A-Z0-9_]+)`?\s*\|\s*`?([^|`]*?)`?\s*\|", re.M)


def table(text: str) -> dict[str, str]:
    """{variable: default} of a markdown table, with every way of writing "unset" as "(none)"."""
    return {name: "(none)" if default.strip() in UNSET else default.strip()
            for name, default in ROW.findall(text)}


def test_every_variable_is_documented_in_the_settings_module():
    documented = table(settings_module.__doc__ or "")
    assert set(documented) == known_variables()


def test_the_documented_defaults_are_the_real_ones():
    d = Settings()
    for name, default in table(settings_module.__doc__ or "").items():
        value = getattr(d, name.removeprefix("MLSIGNAL_").lower())
        if default in UNSET:
            assert value in (None, "", ()), name
        elif isinstance(value, Path):
            assert value == Path(default), name
        elif isinstance(value, bool):
            assert value == (default == "1"), name
        elif isinstance(value, float):
            assert value == float(default), name
        else:
            assert str(value) == default, (name, value, default)


def test_the_readme_table_matches_the_settings_module():
    section = README.read_text().split("### Configuration", 1)[1].split("\n### ", 1)[0]
    assert table(section) == table(settings_module.__doc__ or "")
