"""Command line and (distributed) job entry points of Macformer."""
