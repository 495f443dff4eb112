"""Sentencepiece tokenizer: train one on a bounded sample of the corpus, or load a given model."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from pipelines.errors import PipelineError

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
MODEL_TYPES = ("bpe", "unigram")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sample_lines(texts: Iterable[str], max_bytes: int, max_line_bytes: int) -> Iterator[str]:
    """Lines of the corpus up to `max_bytes` in total: sentencepiece trains on sentences (lines)."""
    used = 0
    for text in texts:
        for line in text.splitlines():
            if not line.strip():
                continue
            line = line[:max_line_bytes]
            used += len(line.encode("utf-8"))
            yield line
            if used >= max_bytes:
                return


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, model_type: str = "bpe", sample_bytes: int = 8 << 20
) -> bytes:
    """Train a sentencepiece model (byte fallback, whitespace kept for code) and return its bytes.

    Newlines are one user-defined piece (documents are encoded whole, lines included); ids 0-3 are
    unk, bos, eos, pad.
    """
    if model_type not in MODEL_TYPES:
        raise PipelineError(f"unknown tokenizer type {model_type!r}; use one of {', '.join(MODEL_TYPES)}")
    if vocab_size < 300:  # 256 byte pieces + specials + room for merges
        raise PipelineError(f"--vocab-size {vocab_size} is too small for a byte-fallback tokenizer; use >= 300")
    model = io.BytesIO()
    lines = list(_sample_lines(texts, sample_bytes, max_line_bytes=4096))
    if not lines:
        raise PipelineError("the corpus has no non-empty line to train a tokenizer on; give inputs with text")
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            byte_fallback=True, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
            user_defined_symbols=["\n"], remove_extra_whitespaces=False, normalization_rule_name="identity",
            allow_whitespace_only_pieces=True, split_digits=True, character_coverage=1.0,
            max_sentence_length=16384, num_threads=1, minloglevel=2,
        )
    except RuntimeError as error:
        message = str(error).splitlines()[0]
        if "smaller than required_chars" in message:  # "... required_chars. 300 vs 348."
            needed = message.rsplit(" vs ", 1)[-1].split(".")[0]
            raise PipelineError(f"--vocab-size {vocab_size} is smaller than this corpus's {needed} distinct "
                                f"characters plus special pieces; raise --vocab-size to at least {needed}") from None
        if "Vocabulary size" in message or "vocab_size" in message:
            raise PipelineError(f"--vocab-size {vocab_size} is larger than this corpus supports ({message}); "
                                "lower --vocab-size or add data") from None
        raise PipelineError(f"sentencepiece training failed: {message}") from None
    return model.getvalue()


def load_tokenizer_bytes(path: str | Path) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"tokenizer {path} not found; pass a sentencepiece .model file or use --vocab-size")
    data = path.read_bytes()
    processor = processor_from_bytes(data, source=str(path))
    if processor.eos_id() < 0:
        raise PipelineError(f"tokenizer {path} has no EOS piece; train it with an eos_id (or use --vocab-size)")
    return data


def processor_from_bytes(data: bytes, source: str = "tokenizer") -> spm.SentencePieceProcessor:
    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(data)
    except (RuntimeError, OSError, TypeError):
        raise PipelineError(f"{source} is not a valid sentencepiece model; retrain it or use --vocab-size") from None
    return processor
