"""`rayft tune`: hyper-parameter searches with Ray Tune over rayft training runs."""

from __future__ import annotations

from trainers.errors import UserError


def add_parsers(sub) -> None:
    p = sub.add_parser("tune", help="search hyper-parameters with Ray Tune (ASHA early stopping)")
    p.set_defaults(func=_not_yet)


def _not_yet(args) -> int:
    raise UserError(f"`rayft {args.command}` is not available yet")
