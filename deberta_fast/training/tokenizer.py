"""The embedded default tokenizer: a SentencePiece unigram model trained on the bundled corpus at first use.

transformers 5's DebertaV2Tokenizer is a `tokenizers` backend that ignores a ``vocab_file`` argument, so the
trained pieces and scores are handed over as its ``vocab`` list, and the result is cached through
``save_pretrained`` (tokenizer.json) in ``$DEBERTA_FAST_CACHE`` (default ``~/.cache/deberta_fast``), keyed by the
corpus content and the vocabulary size.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile

from .data import bundled_path, read_corpus, read_labelled

SPECIAL_TOKENS = {"pad": "[PAD]", "cls": "[CLS]", "sep": "[SEP]", "unk": "[UNK]", "mask": "[MASK]"}


def cache_root() -> str:
    base = os.environ.get("DEBERTA_FAST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "deberta_fast"
    )
    os.makedirs(base, exist_ok=True)
    return base


def bundled_corpus() -> list[str]:
    """Training texts plus plot synopses: what the default tokenizer and the masked-LM warm-up read."""
    return read_labelled(bundled_path("train.jsonl")).texts + read_corpus(bundled_path("plots.txt"))


def train_sentencepiece(lines: list[str], vocab_size: int) -> list[tuple[str, float]]:
    """Unigram SentencePiece model over ``lines``; returns (piece, score) in id order.

    Ids: 0 [PAD], 1 [CLS], 2 [SEP], 3 [UNK], 4 [MASK], then the learned pieces.
    """
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, pad_piece=SPECIAL_TOKENS["pad"], bos_id=1, bos_piece=SPECIAL_TOKENS["cls"],
        eos_id=2, eos_piece=SPECIAL_TOKENS["sep"], unk_id=3, unk_piece=SPECIAL_TOKENS["unk"],
        user_defined_symbols=[SPECIAL_TOKENS["mask"]], character_coverage=1.0, num_threads=1,
        minloglevel=2,
    )
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    return [(processor.id_to_piece(i), float(processor.get_score(i))) for i in range(processor.get_piece_size())]


def build_tokenizer(vocab: list[tuple[str, float]]):
    from transformers import DebertaV2Tokenizer

    return DebertaV2Tokenizer(
        vocab=vocab, bos_token=SPECIAL_TOKENS["cls"], eos_token=SPECIAL_TOKENS["sep"],
        unk_token=SPECIAL_TOKENS["unk"], sep_token=SPECIAL_TOKENS["sep"], pad_token=SPECIAL_TOKENS["pad"],
        cls_token=SPECIAL_TOKENS["cls"], mask_token=SPECIAL_TOKENS["mask"],
    )


def default_tokenizer(vocab_size: int = 8000):
    """The cached default tokenizer, trained on first use (a few seconds)."""
    from transformers import DebertaV2Tokenizer

    lines = bundled_corpus()
    digest = hashlib.sha256("\n".join(lines).encode("utf-8") + f"|{vocab_size}|v1".encode()).hexdigest()[:16]
    directory = os.path.join(cache_root(), f"tokenizer-{digest}")
    if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
        staging = tempfile.mkdtemp(prefix="tokenizer-", dir=cache_root())
        try:
            build_tokenizer(train_sentencepiece(lines, vocab_size)).save_pretrained(staging)
            try:
                os.replace(staging, directory)  # atomic; another process may have won the race
            except OSError:
                pass
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return DebertaV2Tokenizer.from_pretrained(directory)
