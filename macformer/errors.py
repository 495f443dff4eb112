"""The project's one error type for bad input (settings, arguments, files): its message is a single
line that names the problem and the fix. The command line prints it as is (exit code 2) and lets
every other exception, a bug, show its traceback. A ValueError, so callers catching that still work."""


class MacformerError(ValueError):
    pass
