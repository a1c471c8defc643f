"""``numgpt <command>``: parses flags, calls the library, prints results. Nothing else.

Each command is a pair: ``_add_<name>(subparsers)`` declares its flags and
``_run_<name>(args) -> int`` calls the library and returns the exit status. A
``NumGPTError`` is printed as one line (``numgpt: error: ...``) with exit status 2,
never as a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import NumGPTError

__all__ = ["main", "build_parser"]


# ------------------------------------------------------------------------ gradcheck

def _add_gradcheck(sub) -> None:
    p = sub.add_parser("gradcheck", help="run the gradient-check gate over every op and composite")
    p.add_argument("--out", default="docs/results/gradcheck.md", help="Markdown table to write")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_run_gradcheck)


def _run_gradcheck(args) -> int:
    from . import gradcheck

    results = gradcheck.run_gate(seed=args.seed)
    print(gradcheck.format_table(results))
    gradcheck.write_table(results, args.out)
    bad = [r for r in results if not r.ok]
    n = sum(1 for r in results if not r.expect_fail)
    print(f"\n{n - sum(1 for r in bad if not r.expect_fail)}/{n} checks pass; "
          f"negative control {'FAILED as it must' if not any(r.expect_fail for r in bad) else 'PASSED: gate broken'}; "
          f"table written to {args.out}")
    return 1 if bad else 0


# --------------------------------------------------------------------------- parser

_COMMANDS = [_add_gradcheck]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="numgpt", description=__doc__.splitlines()[0])
    from . import __version__
    parser.add_argument("--version", action="version", version=f"numgpt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except NumGPTError as exc:
        print(f"numgpt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("numgpt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
