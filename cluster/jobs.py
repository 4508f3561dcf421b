"""`rayft submit` and `rayft jobs`: runs submitted to a Ray cluster as Ray Jobs."""

from __future__ import annotations

from trainers.errors import UserError


def add_parsers(sub) -> None:
    p = sub.add_parser("submit", help="submit a training run to a Ray cluster as a Ray Job")
    p.set_defaults(func=_not_yet)
    p = sub.add_parser("jobs", help="list, inspect, follow and stop submitted Ray Jobs")
    p.set_defaults(func=_not_yet)


def _not_yet(args) -> int:
    raise UserError(f"`rayft {args.command}` is not available yet")
