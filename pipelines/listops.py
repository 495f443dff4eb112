"""ListOps (Nangia & Bowman 2018) as specified by Long Range Arena: nested MAX, MIN, MED and SUM_MOD
over digits 0-9 in prefix notation; the label (0-9) is the value of the expression.

Generation follows LRA: a node is an operator with probability 0.25 (a digit otherwise, and always
at depth `max_depth`), operators take 2 to `max_args` arguments, and only sequences of `min_length`
to `max_length` tokens are kept (brackets count, the LRA input has no parentheses). MED of an even
number of values is the integer part of the mean of the two middle ones.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from macformer.errors import MacformerError, check_positive_int

OPERATORS = ("[MAX", "[MIN", "[MED", "[SM")
CLOSE = "]"
DIGITS = tuple(str(d) for d in range(10))
PAD = "<pad>"
VOCAB = (PAD, *OPERATORS, CLOSE, *DIGITS)  # token id = index; 0 pads
TOKEN_IDS = {token: index for index, token in enumerate(VOCAB)}
NUM_CLASSES = 10
VALUE_PROBABILITY = 0.75  # LRA: a node is an operator with probability 0.25


def apply(operator: str, values: Sequence[int]) -> int:
    if operator == "[MAX":
        return max(values)
    if operator == "[MIN":
        return min(values)
    if operator == "[MED":
        return int(statistics.median(values))
    return sum(values) % 10


@dataclass(frozen=True)
class ListOpsSpec:
    max_depth: int = 10
    max_args: int = 10
    min_length: int = 500
    max_length: int = 2000

    def __post_init__(self) -> None:
        for name in ("max_depth", "max_args", "min_length", "max_length"):
            check_positive_int(f"ListOps {name}", getattr(self, name))
        if self.max_args < 2:
            raise MacformerError(f"ListOps max_args must be at least 2 (operators take 2 or more), got {self.max_args}")
        if self.min_length > self.max_length:
            raise MacformerError(f"ListOps min_length={self.min_length} exceeds max_length={self.max_length}; "
                             "lower --min-length or raise --max-length")


def _tree(rng: random.Random, depth: int, spec: ListOpsSpec, out: list[str]) -> int:
    """Append one random subtree's tokens to `out`; return its value."""
    if depth >= spec.max_depth or rng.random() < VALUE_PROBABILITY:
        value = rng.randrange(10)
        out.append(DIGITS[value])
        return value
    operator = rng.choice(OPERATORS)
    out.append(operator)
    values = [_tree(rng, depth + 1, spec, out) for _ in range(rng.randint(2, spec.max_args))]
    out.append(CLOSE)
    return apply(operator, values)


def generate(count: int, seed: int, spec: ListOpsSpec = ListOpsSpec(), max_attempts: int | None = None
             ) -> Iterator[tuple[list[str], int]]:
    """`count` distinct (tokens, label) pairs whose length lies in [min_length, max_length]."""
    rng, seen, produced, attempts = random.Random(seed), set(), 0, 0
    limit = max_attempts if max_attempts is not None else 10_000 * count + 100_000
    while produced < count:
        attempts += 1
        if attempts > limit:
            raise MacformerError(f"ListOps: only {produced} of {count} samples in {limit} attempts; "
                             "widen --min-length/--max-length or raise --max-depth")
        tokens: list[str] = []
        # Depth 1 at the root, as in LRA; the root is always an operator.
        operator = rng.choice(OPERATORS)
        tokens.append(operator)
        values = [_tree(rng, 2, spec, tokens) for _ in range(rng.randint(2, spec.max_args))]
        tokens.append(CLOSE)
        if not spec.min_length <= len(tokens) <= spec.max_length:
            continue
        key = " ".join(tokens)
        if key in seen:
            continue
        seen.add(key)
        produced += 1
        yield tokens, apply(operator, values)


def evaluate(tokens: Sequence[str]) -> int:
    """Value of a ListOps token sequence, computed independently of the generator (a stack parser)."""
    stack: list[tuple[str, list[int]]] = []
    result = None
    for token in tokens:
        if token in OPERATORS:
            stack.append((token, []))
        elif token == CLOSE:
            if not stack:
                raise MacformerError("ListOps: ']' without an open operator")
            operator, values = stack.pop()
            if not values:
                raise MacformerError(f"ListOps: {operator} closed without arguments")
            value = apply(operator, values)
            if stack:
                stack[-1][1].append(value)
            else:
                result = value
        elif token in DIGITS:
            if not stack:
                raise MacformerError("ListOps: a digit outside any operator")
            stack[-1][1].append(int(token))
        else:
            raise MacformerError(f"ListOps: unknown token {token!r}")
    if stack or result is None:
        raise MacformerError("ListOps: unbalanced expression")
    return result


def encode(tokens: Sequence[str]) -> list[int]:
    return [TOKEN_IDS[t] for t in tokens]
