"""The ``kdkit`` command, one module per stage: thin — parse, call the library, print.

    group.py     the command group (one error base handled once), shared options and printing
    teacher.py   precompute · generate · teacher check · cache info/diff/verify
    train.py     validate · train · merge · barrier tau · student init · config · diag
    evaluate.py  verify · eval
    decide.py    gate · ladder · registry · report · demo

The modules register their commands on :data:`app` when imported, in this order (``--help`` lists them so).
"""

from kdkit.cli import teacher, train, evaluate, decide  # noqa: F401, I001 - registers the commands, in --help's order
from kdkit.cli.group import app

__all__ = ["app"]
