"""The project's one error type for bad input (settings, arguments, files): its message is a single
line that names the problem and the fix. The command line prints it as is (exit code 2) and lets
every other exception, a bug, show its traceback. A ValueError, so callers catching that still work.
Beside it, the positive-integer check that settings everywhere share."""


class MacformerError(ValueError):
    pass


def is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_positive_int(name: str, value: object, error: type[MacformerError] = MacformerError) -> int:
    """`value` if it is a positive int (bool is not), else `error` naming the setting."""
    if not is_positive_int(value):
        raise error(f"{name} must be a positive integer, got {value!r}")
    return value
