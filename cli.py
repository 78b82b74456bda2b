"""Command lines: dataclass configs as argparse parsers, checks of output paths before any
work, and the one runner every script ends with (`run_main`)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback
from dataclasses import MISSING, fields
from pathlib import Path


class UserError(RuntimeError):
    """Bad input from the user; scripts print the message and exit with status 2."""


def opt(default, help: str, **kw):
    """A config field with its --help text (say the unit in it)."""
    return dataclasses.field(default=default, metadata={"help": help, **kw})


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" to an option's help unless its text already names the default."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "default" in text else super()._get_help_string(action)


def parse_config(cls, argv, description: str, prog: str | None = None):
    """Build an argparse parser from a config dataclass; unknown or ill-typed options are
    rejected. A field whose metadata says positional=True takes one or more arguments."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=_HelpFormatter)
    for f in fields(cls):
        if f.metadata.get("positional"):
            parser.add_argument(f.name, nargs="+", help=f.metadata.get("help", ""))
            continue
        name = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        kw = {"help": f.metadata.get("help", ""), "default": default}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        ftype = f.type if isinstance(f.type, type) else eval(f.type, {"Path": Path})  # "int | None" etc.
        if _scalar_type(ftype) is bool:  # bool, or bool | None (None: a default filled in later)
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = _scalar_type(ftype)
        parser.add_argument(name, **kw)
    args = parser.parse_args(argv)
    return cls(**vars(args))


def _scalar_type(t):
    if t in (int, float, str, bool):
        return t
    args = [a for a in getattr(t, "__args__", ()) if a is not type(None)]
    return args[0] if args else str


# ---------------------------------------------------------------- output paths, checked up front


def _first_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_dir(path, option: str) -> None:
    """The folder exists and is writable, or can be created (checked without creating it)."""
    p = Path(path)
    base = _first_existing(p)
    if not base.is_dir():
        raise UserError(f"{option} {path}: {base} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path}: {base} is not writable")


def check_output_file(path, option: str) -> None:
    """The file can be written: it is not a folder and its folder exists or can be created."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{option} {path} is a folder, not a file")
    if p.exists() and not os.access(p, os.W_OK):
        raise UserError(f"{option} {path} is not writable")
    check_output_dir(p.parent, option)


# ---------------------------------------------------------------- the runner


def exit_status(fn, argv=None) -> int:
    """Run fn(argv) and say how it ended: 0, 2 for bad input (one `error:` line), the code of
    a SystemExit (argparse, --help), 1 with a traceback for anything else."""
    from data import DataError

    try:
        fn(argv)
        return 0
    except (UserError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        return 1


def hard_exit(status: int) -> None:
    """End the process with `status`, whatever Concrete registered.

    Once a process has run a Concrete circuit (real FHE or simulation), concrete-python 2.10's
    runtime ends it with status 0 at interpreter exit: a SystemExit(2) or an uncaught
    exception would reach the shell as success. os._exit skips that exit handler; the output
    streams are flushed first because os._exit does not flush them."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def run_main(fn) -> None:
    """What every script ends with: run fn(sys.argv[1:]) and exit with its real status."""
    hard_exit(exit_status(fn))
