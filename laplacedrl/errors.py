"""User-facing errors and the CLIs' guard (no torch import here: ``--help`` stays fast).

A :class:`UserError` is raised for anything the user can fix (a bad path, flag, label file or
checkpoint). :func:`main_guard` prints its message as one line and exits with status 2, so a user
never sees a traceback for their own mistake; a closed output pipe (``| head``) ends quietly with
status 141. Programming errors stay ordinary exceptions.
"""
import logging
import os
import sys


class UserError(Exception):
    """A problem with the user's input; the message names it in one line."""


def main_guard(fn, argv=None) -> int:
    """Run ``fn(argv)``; user errors become ``error: <message>`` on stderr (and in the run dir's
    log.txt when one is open) and exit status 2."""
    try:
        fn(argv)
    except UserError as e:
        log = logging.getLogger("laplacedrl")
        record = log.makeRecord(log.name, logging.ERROR, __file__, 0, f"error: {e}", None, None)
        for handler in log.handlers:
            if isinstance(handler, logging.FileHandler):     # the run dir's log.txt, if one is open
                handler.handle(record)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:               # whoever read our output went away (`| head`): end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141                        # 128 + SIGPIPE, what a shell reports for such a writer
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0
