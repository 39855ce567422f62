"""`moetune` console script. Each subcommand lives in its own module, which provides
`add_arguments(parser)` and `main(args) -> int`; this file only wires them up and turns a
MoetuneError into one clear line instead of a traceback."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import NoReturn

from moetune.device import use_interpreter_if_no_gpu
from moetune.errors import MoetuneError

DESCRIPTION = (
    "Tune the Triton fused-MoE kernel for the GPU you have and write config tables vLLM and SGLang load "
    "unchanged. With no GPU, --model tiny runs every command on the CPU through Triton's interpreter."
)

SUBCOMMANDS = {
    "run": ("moetune.tuning.cli", "tune the fused-MoE kernel with Optuna and write vLLM-format tables"),
    "bench": ("moetune.bench", "time the whole MoE layer, default vs table config, against the roofline"),
    "show": ("moetune.tablecli", "print a table with its sidecar: M, config, tuned/default µs, speedup"),
    "validate": ("moetune.tablecli", "check every table in a folder (schema, naming, and kernel on this GPU)"),
}


class _Parser(argparse.ArgumentParser):
    """argparse's errors as the rest of moetune's: one line naming the flag and value, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moetune", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        getattr(importlib.import_module(module), f"add_{name}_arguments")(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    use_interpreter_if_no_gpu()  # before build_parser imports the subcommands, and with them the kernels
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad value (2, its one line already printed): a return code
        return int(e.code or 0)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        return int(getattr(module, f"{args.command}_main")(args) or 0)
    except MoetuneError as e:
        print(f"moetune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moetune {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
