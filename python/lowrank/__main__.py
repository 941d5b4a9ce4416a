"""Command line: ``python -m lowrank info`` prints what was built and what this machine can run."""

from __future__ import annotations

import argparse
import json
import sys

_UNBOUNDED = 1 << 62  # ops/_dispatch.py's "no limit"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lowrank", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="build and machine report")
    p_info.add_argument("--json", action="store_true", help="print JSON")
    p_info.add_argument("--no-calibrate", action="store_true",
                        help="show only the code-path decisions already taken or cached on disk; measure nothing")
    args = parser.parse_args(argv)
    if args.command == "info":
        from . import info

        report = info(calibrate=not args.no_calibrate)
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            width = max(len(k) for k in report)
            for k, v in report.items():
                if k == "dispatch_timings_ms":
                    continue
                if isinstance(v, dict):
                    print(k)
                    inner = max((len(name) for name in v), default=0)
                    for name, value in v.items():
                        shown = "no limit" if value == _UNBOUNDED else value
                        print(f"  {name:<{inner}}  {shown!s:<8}  ms: {report['dispatch_timings_ms'].get(name)}")
                else:
                    print(f"{k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
