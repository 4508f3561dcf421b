"""Entry point: `python -m benchmarks WORKLOAD [options]` (see benchmarks/__init__.py)."""

import sys

from benchmarks.common import WORKLOADS


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in (*WORKLOADS, "all"):
        sys.exit(f"usage: python -m benchmarks {{{','.join(WORKLOADS)},all}} [options]")
    import importlib

    names = list(WORKLOADS) if sys.argv[1] == "all" else [sys.argv[1]]
    for name in names:
        importlib.import_module(f"benchmarks.{name}").main(sys.argv[2:] if len(names) == 1 else [])


if __name__ == "__main__":
    main()
