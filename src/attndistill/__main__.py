"""``python -m attndistill``: the command line where the ``attndistill`` script is not on PATH (a source tree
on PYTHONPATH, as on the benchmark machines, or another environment's Python)."""

from .cli import main

main()
