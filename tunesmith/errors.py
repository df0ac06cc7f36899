"""Errors a user can act on. The CLI prints them as one message (no traceback) and exits non-zero."""


class TunesmithError(Exception):
    """Base for user-facing errors."""


class DataError(TunesmithError):
    """A problem in a dataset row: names the file, the line (or row), the field, what was expected, and the fix."""

    def __init__(self, source: str, line, field: str, problem: str, fix: str = ""):
        self.source, self.line, self.field, self.problem, self.fix = source, line, field, problem, fix
        where = f"{source}:{line}" if line is not None else source
        msg = f"{where}: field '{field}': {problem}" if field else f"{where}: {problem}"
        if fix:
            msg += f" Fix: {fix}"
        super().__init__(msg)

    @property
    def short(self) -> str:
        """The message without the location (used when counting dropped rows)."""
        return f"{self.field}: {self.problem}" if self.field else self.problem


class ConfigError(TunesmithError):
    """Arguments that parse but do not fit together (or do not fit the model/data)."""


class FlagError(ConfigError):
    """Flag values found wrong before anything loads (every problem at once); the CLI exits 2 for it, as for a
    flag that does not parse."""


class Interrupted(TunesmithError):
    """A signal stopped the command (SIGTERM, or SIGINT / Ctrl-C): the CLI prints the message once (rank 0 under
    torchrun, where every process gets the signal) and exits 128 + the signal's number (143, 130), as the shell
    reports a process killed by it."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
