"""The one error type the pipelines raise for bad input: its message is a single line that names
the problem and the fix, printed as is by the command line (exit code 2)."""


class PipelineError(ValueError):
    pass
