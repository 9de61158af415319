"""Errors, classified once: retrying a terminal error cannot help, a retryable one may pass. And
the exit codes that say which kind ended a command or the daemon."""

EXIT_OK = 0
EXIT_FAILURE = 1  # the kernel refused or something else went wrong at run time
EXIT_USAGE = 2  # argparse's own code for bad arguments; also bad input to calc
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: this host lacks a tool or kernel module; restarting cannot help
EXIT_CONFIG = 78  # EX_CONFIG: systemd's RestartPreventExitStatus=78 stops a restart loop


class MapeError(Exception):
    """Something the user should read: the message names the problem."""


class TerminalError(MapeError):
    """Retrying will not help until the user changes something (config, kernel, a name clash)."""


class RetryableError(MapeError):
    """A kernel call failed in a way that may pass (busy lock, a link that is going away)."""


class CannotRunHere(TerminalError):
    """This host lacks something the daemon needs (a tool, a kernel module): the service exits
    with EXIT_UNAVAILABLE, which the unit does not restart on."""


class ConflictError(TerminalError):
    """Another program's object holds a name or slot we need; we never change it."""
