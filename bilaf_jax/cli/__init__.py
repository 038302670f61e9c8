"""The `bilaf` command: `bilaf select | extract | finetune | run`.

Each subcommand lives in its own module `cmd_<name>.py` exposing `register(subparsers)`, which
adds an argparse parser whose default `func(args) -> int` does the work. Heavy imports (JAX,
Flax, TFDS) happen inside `func`, so `bilaf --help` stays fast.

User errors (`ValueError`, including `bilaf_jax.io.InputError`, and missing files) become one
line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("select", "extract", "finetune", "run")


class UsageError(ValueError):
    """Raised by subcommands for bad arguments; printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's own convention too)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help that ends with each option's default, unless the help says it or there is none."""

    def _get_help_string(self, action):
        help = action.help or ""
        if action.default is None or action.default is False or "default" in help:
            return help
        return super()._get_help_string(action)


SEED_LIMIT = 2**32  # JAX keeps 32 bits of an integer seed: 2**32 would repeat seed 0


def seed_type(text: str) -> int:
    """argparse type of --seed: an integer in [0, 2**32)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"seed must lie in [0, 2**32), got {text}")
    return value


def workdir_type(text: str) -> str:
    """argparse type of --workdir: not empty (`--workdir "$UNSET"` would be the current folder)."""
    if not text:
        raise argparse.ArgumentTypeError("--workdir is empty")
    return text


def add_mesh_options(parser) -> None:
    """--mesh and the multi-process options (see `bilaf_jax.sharding`)."""
    g = parser.add_argument_group("devices")
    g.add_argument("--mesh", default=None, metavar="N|all",
                   help="shard the pool's rows over the first N devices ('all': every device of "
                   "every process); default: one device, or all with --distributed")
    g.add_argument("--distributed", action="store_true",
                   help="join a multi-process run first (jax.distributed.initialize): start the "
                   "same command on every host; only process 0 writes files")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="with --distributed where JAX cannot detect the cluster: process 0's address")
    g.add_argument("--num-processes", type=int, default=None, help="with --coordinator")
    g.add_argument("--process-id", type=int, default=None, help="with --coordinator")


def setup_mesh(args):
    """Act on `add_mesh_options`' arguments: join the run, build the mesh (or None)."""
    manual = (args.coordinator, args.num_processes, args.process_id)
    if not args.distributed and any(v is not None for v in manual):
        raise UsageError("--coordinator, --num-processes and --process-id need --distributed")
    from bilaf_jax import sharding

    if args.distributed:
        # With a coordinator given, joining waits silently for every process: say so. (Where
        # JAX detects the cluster, a missing one is an error at once.)
        note = (None if args.coordinator is None else lambda: sys.stderr.write(
            f"note: joining the run of {args.num_processes} processes at {args.coordinator}; "
            "this waits for all of them\n"))
        sharding.initialize_distributed(*manual, on_wait=note)
    count = sharding.parse_mesh("all" if args.distributed and args.mesh is None else args.mesh)
    return None if count is None else sharding.make_mesh(count)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bilaf",
        description="BiLAF active finetuning in JAX: select samples to label, extract "
        "features, finetune, and run the end-to-end benchmark.",
    )
    from bilaf_jax import __version__

    parser.add_argument("--version", action="version", version=f"bilaf {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMANDS:
        module = importlib.import_module(f"bilaf_jax.cli.cmd_{name}")
        module.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # What was typed after `bilaf`, for records of the command (sys.argv is another
    # program's where main(argv) is called in-process)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        sys.stderr.write(f"bilaf {args.command}: interrupted\n")
        return 130
    except (ValueError, FileNotFoundError, PermissionError, IsADirectoryError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        sys.stderr.write(f"bilaf {args.command}: error: {msg}\n")
        return 2
    return int(code or 0)

