"""Write README's config reference (between the config-reference markers) from the config's models: the same
table as `kdkit config reference`; tests/test_config_reference.py fails when README differs.

    python scripts/readme_config.py
"""

from pathlib import Path

from kdkit.config.reference import reference_table

START, END = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"
README = Path(__file__).resolve().parents[1] / "README.md"

if __name__ == "__main__":
    before, rest = README.read_text().split(START, 1)
    README.write_text(before + START + reference_table() + END + rest.split(END, 1)[1])
