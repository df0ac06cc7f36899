"""`python -m tunesmith`: the same entry point as the `tunesmith` console script (`tunesmith.cli.main`).

Nothing else lives here: no arguments, imports or logic of its own (torchrun relaunches `-m tunesmith`, so this
must stay equivalent to the console script).
"""
import sys

from tunesmith.cli import main

sys.exit(main())
