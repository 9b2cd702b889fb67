"""Write the docs' config reference (docs/config-reference.md, between the config-reference markers) from the
config's models: the same table as `kdkit config reference`; tests/test_config_reference.py fails when the page
differs.

    python scripts/docs_config.py
"""

from pathlib import Path

from kdkit.config.reference import reference_table

START, END = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"
PAGE = Path(__file__).resolve().parents[1] / "docs" / "config-reference.md"

if __name__ == "__main__":
    before, rest = PAGE.read_text().split(START, 1)
    PAGE.write_text(before + START + reference_table() + END + rest.split(END, 1)[1])
