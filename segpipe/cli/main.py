"""The ``segpipe`` entry point: parse, compose the settings once, run the command's handler, and
turn every error into one or two lines and its exit code."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import traceback
import warnings

from ..errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE, SegpipeError, StateError
from .commands import HANDLERS, QUIET
from .parser import COMMANDS, build_parser, flag_overrides, given_settings, split_arguments


def _os_error(exc: OSError) -> SegpipeError | None:
    """Workspace problems the system reports (disk full, read-only, no permission) as exit-4 errors."""
    where = exc.filename or ""
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return StateError(
            f"no space left on the device writing {where}".rstrip(),
            hint="free some disk space or write elsewhere (work_dir=PATH, or -o OUT for infer and evaluate); "
            "finished work is kept",
        )
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return StateError(
            f"cannot write {where}: {exc.strerror}".rstrip(),
            hint="write to a writable place (work_dir=PATH, or -o OUT for infer and evaluate), or fix the folder's permissions",
        )
    return None


#: what frees memory, per command
MEMORY_FIXES = {
    "infer": "segment with fewer windows per pass (batch_size=1), without probabilities=true, "
    "or on a machine with more memory",
    "train": "a smaller batch_size=, fewer num_workers=, or a machine with more memory",
    "plan": "fewer num_workers= (each worker holds one case), or a machine with more memory",
    "preprocess": "fewer num_workers= (each worker holds one case), or a machine with more memory",
    "check": "fewer num_workers= (each worker holds one case), or a machine with more memory",
}


def out_of_memory(command: str, exc: BaseException) -> StateError:
    """An allocation that failed, as an exit-4 error: what was asked for, what is free, and the fix."""
    import resource

    from ..io.limits import available_memory

    detail = str(exc).strip().split(" for an array")[0] or "an allocation failed"
    free = f"{available_memory() / 2**30:.1f} GiB free on the machine"
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit != resource.RLIM_INFINITY:
        free += f", the process limited to {limit / 2**30:.1f} GiB of address space"
    return StateError(
        f"out of memory ({detail}; {free})",
        hint=MEMORY_FIXES.get(command, "free memory or use a machine with more memory"),
    )


def _print_error(command: str, ns: argparse.Namespace, etype: str, message: str, *, fix: str | None, code: int) -> int:
    print(f"segpipe {command}: error: {message}" + (f"\n  fix: {fix}" if fix else ""), file=sys.stderr)
    if getattr(ns, "json", False):
        print(json.dumps({"ok": False, "error": {"type": etype, "message": message, "fix": fix, "exit_code": code}}))
    return code


class _Formatter(logging.Formatter):
    """Progress and information as they are; a warning or error as ``segpipe COMMAND: warning: …``."""

    def __init__(self, command: str) -> None:
        super().__init__("%(message)s")
        self.command = command

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"segpipe {self.command}: {record.levelname.lower()}: {text}"
        return text


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    wants_help = any(a in ("-h", "--help") for a in argv)
    help_for = next((a for a in argv if a in COMMANDS), None) if wants_help else None
    parser = build_parser(help_for)
    # Options may sit between paths and overrides (`check DATA --json work_dir=W`): argparse stops
    # a '*' positional at the first option, so leftovers that are not options are arguments too.
    ns, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        ns.args = [*getattr(ns, "args", []), *extra]
    if not ns.command:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(ns.command))
    logging.basicConfig(
        level=logging.DEBUG if ns.debug else logging.WARNING if ns.quiet else logging.INFO, handlers=[handler]
    )
    for h in logging.getLogger().handlers:  # a second command in one process (the API, tests): its name
        if isinstance(h.formatter, _Formatter):
            h.formatter.command = ns.command
    if not ns.debug:
        warnings.filterwarnings("ignore")
    command = ns.command
    try:
        from ..config import compose_config

        paths, overrides = split_arguments(ns.args)
        overrides = flag_overrides(ns, command, overrides)
        cfg = compose_config(overrides, command=command)
        code, result, text = HANDLERS[command](ns, paths, given_settings(cfg, overrides, command))
    except SegpipeError as exc:
        if ns.debug:
            traceback.print_exc()
        return _print_error(command, ns, type(exc).__name__, exc.message, fix=exc.hint, code=exc.exit_code)
    except KeyboardInterrupt:
        return _print_error(command, ns, "KeyboardInterrupt", "interrupted", fix=None, code=EXIT_INTERRUPTED)
    except MemoryError as exc:
        if ns.debug:
            traceback.print_exc()
        oom = out_of_memory(command, exc)
        return _print_error(command, ns, "MemoryError", oom.message, fix=oom.hint, code=oom.exit_code)
    except OSError as exc:
        mapped = _os_error(exc)
        if mapped is None:
            return _internal(command, ns, exc)
        if ns.debug:
            traceback.print_exc()
        return _print_error(command, ns, type(mapped).__name__, mapped.message, fix=mapped.hint, code=mapped.exit_code)
    except Exception as exc:  # a bug: keep it to one line unless --debug
        return _internal(command, ns, exc)
    if result is QUIET:  # another process of a distributed run: rank 0 speaks for it
        return code
    try:
        if ns.json:
            print(json.dumps(result, indent=2, default=str))
        elif text:
            print(text)
        sys.stdout.flush()
    except BrokenPipeError:  # `segpipe ... | head`: the reader left, nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return code


def _internal(command: str, ns: argparse.Namespace, exc: BaseException) -> int:
    if ns.debug:
        traceback.print_exc()
    return _print_error(
        command,
        ns,
        type(exc).__name__,
        f"internal error: {type(exc).__name__}: {exc}",
        fix="rerun with --debug and report the traceback",
        code=EXIT_INTERNAL,
    )
