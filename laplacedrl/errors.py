"""User-facing errors and the CLIs' guard (no torch import here: ``--help`` stays fast).

A :class:`UserError` is raised for anything the user can fix (a bad path, flag, label file or
checkpoint). :func:`main_guard` prints its message as one line and exits with status 2, so a user
never sees a traceback for their own mistake; a closed output pipe (``| head``) ends quietly with
status 141; a run stopped by a signal after saving (:mod:`laplacedrl.engine.stop`) says so in one
line and exits with 128 + the signal's number. Programming errors stay ordinary exceptions.
"""
import argparse
import logging
import os
import sys


class UserError(Exception):
    """A problem with the user's input; the message names it in one line."""


class Stopped(Exception):
    """A run that stopped on a signal after writing its resumable state (see
    :mod:`laplacedrl.engine.stop`); the CLI exits with ``exit_status`` (128 + the signal's number)."""

    def __init__(self, message: str, exit_status: int):
        super().__init__(message)
        self.exit_status = exit_status


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors (unknown flag, bad choice, missing value) are a
    :class:`UserError`: one line, exit status 2, the usage only with ``--help``."""

    def error(self, message):
        raise UserError(f"{message} (see --help)")


def _to_run_log(line: str) -> None:
    """Write ``line`` to the run dir's log.txt, if one is open."""
    log = logging.getLogger("laplacedrl")
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, line, None, None)
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _say(line: str) -> None:
    """``line`` on stderr in one write. ``print`` writes the text and the newline apart; two ranks
    of a torchrun job, which share one stderr, could then join their lines into one."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def main_guard(fn, argv=None) -> int:
    """Run ``fn(argv)``; user errors become ``error: <message>`` on stderr (and in the run dir's
    log.txt when one is open) and exit status 2."""
    try:
        fn(argv)
    except UserError as e:
        _to_run_log(f"error: {e}")
        _say(f"error: {e}")
        return 2
    except Stopped as e:
        _to_run_log(str(e))
        _say(str(e))
        return e.exit_status
    except BrokenPipeError:               # whoever read our output went away (`| head`): end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141                        # 128 + SIGPIPE, what a shell reports for such a writer
    except KeyboardInterrupt:
        _say("interrupted; rerun the same command to resume")
        return 130
    return 0
