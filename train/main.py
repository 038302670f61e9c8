"""Entry point: `python -m train.main --config configs/fashion_mnist.py --workdir DIR [k=v ...]`.

Each trailing `key=value` overrides one field of the config (values parsed as JSON when they
parse, else kept as strings: `steps=200 mode=linear selection=sel.json`). Errors are one line
on stderr with exit code 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import json
import sys

PROG = "python -m train.main"


def main(argv=None) -> int:
    from bilaf_jax.cli.cmd_finetune import load_config_file
    from train.train import make_config, summary_without_state, train_and_evaluate

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--config", required=True, help="configs/NAME.py or NAME")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    # Overrides may come before, between and after the options (parse_args would refuse those
    # after an option once some came before it).
    args = parser.parse_intermixed_args(argv)

    def fail(e: Exception) -> int:  # one line, as `bilaf finetune` reports errors
        sys.stderr.write(f"{PROG}: error: {' '.join(str(e).split())}\n")
        return 2

    try:
        cfg = load_config_file(args.config)
    except ValueError as e:  # not found, does not load, get_config() fails or is not a dict
        return fail(e)
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            return fail(ValueError(f"override {item!r} is not KEY=VALUE"))
        try:
            cfg[key] = json.loads(value)
        except ValueError:
            cfg[key] = value
    try:
        config = make_config(**cfg)
    except (ValueError, TypeError) as e:  # a bad value of a config key
        return fail(e)
    try:
        result = train_and_evaluate(config, args.workdir)
    except (ValueError, FileNotFoundError, PermissionError, IsADirectoryError) as e:
        return fail(e)  # bad input files
    except KeyboardInterrupt:  # a full run resumes from its last checkpoint
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    for note in result.get("notes", ()):
        sys.stderr.write(f"{PROG}: note: {note}\n")
    summary = summary_without_state(result)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
