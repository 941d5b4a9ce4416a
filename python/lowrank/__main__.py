"""Command line: ``python -m lowrank info`` prints what was built and what this machine can run."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lowrank", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="build and machine report")
    p_info.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    if args.command == "info":
        from . import info

        report = info()
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            width = max(len(k) for k in report)
            for k, v in report.items():
                print(f"{k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
