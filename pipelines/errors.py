"""The error type the pipelines and the launcher raise for bad input (see macformer.errors)."""

from macformer.errors import MacformerError


class PipelineError(MacformerError):
    pass
