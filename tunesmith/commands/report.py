"""`tunesmith report RUN [RUN ...]`: the HTML report of one run, or several runs compared."""
from __future__ import annotations

import os
import sys
from tunesmith.errors import ConfigError
from tunesmith.runs.report import (write_run_report, compare)


def main(args) -> int:
    if not args.runs:
        raise ConfigError("pass one or more run directories: tunesmith report output/<model>/v0-… [v1-… …]")
    if len(args.runs) == 1 and not args.output:
        path = write_run_report(args.runs[0])
    else:
        path = compare(args.runs, args.output or "compare_report.html")
    print(f"[tunesmith] report: {os.path.abspath(path)}", file=sys.stderr)
    return 0
