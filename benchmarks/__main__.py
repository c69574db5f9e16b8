"""`python -m benchmarks [name ...]`: run every benchmark (or the ones named), print the figures and rewrite their
sections of docs/benchmarks.md."""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from benchmarks import report

BENCHMARKS = report.ORDER


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "names", nargs="*", metavar="name", help=f"benchmarks to run (default all): {', '.join(BENCHMARKS)}"
    )
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    failed = []
    for name in args.names or BENCHMARKS:
        module = importlib.import_module(f"benchmarks.{name}")
        print(f"==> {name}: {module.TITLE}", flush=True)
        started = time.monotonic()
        report.begin()
        try:
            module.run()
        except Exception as exc:  # one broken benchmark must not hide the others' figures
            failed.append(name)
            print(f"!! {name} failed: {exc!r}", file=sys.stderr, flush=True)
            import traceback

            traceback.print_exc()
        print(f"==> {name} took {time.monotonic() - started:.0f} s", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
