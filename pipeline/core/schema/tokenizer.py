"""`tokenizer.*`: the tokenizer stage's settings (xlp.pipeline.stages.tokenizer)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from xlp.pipeline.core.schema.data import MiB


# bpe, unigram: SentencePiece; bytelevel_bpe: a Hugging Face `tokenizers` byte-level BPE (GPT-NeoX style)
TOKENIZER_TYPES = ("bpe", "unigram", "bytelevel_bpe")
BYTELEVEL_FIXED = 256 + 2  # the byte alphabet, <|endoftext|> and <|padding|>


@dataclass
class TokenizerConfig:
    """`tokenizer.*`"""

    vocab_size: int = 8000
    # an existing tokenizer instead of training one: a SentencePiece .model, a Hugging Face tokenizer.json,
    # or a folder holding one (a transformers checkpoint)
    path: Optional[str] = None
    type: str = "bpe"  # bpe | unigram (SentencePiece) | bytelevel_bpe (Hugging Face tokenizers)
    byte_fallback: bool = True  # SentencePiece only (a byte-level BPE has every byte)
    character_coverage: float = 0.9995
    sample_bytes: int = 8 * MiB  # about this much text, a uniform sample of documents, trains it
    heldout_bytes: int = 1 * MiB  # about this much other text measures chars per token
    seed: int = 0
    num_threads: int = 0  # SentencePiece training threads; 0 = all CPUs (does not change the model)

    def validate(self) -> None:
        if self.type not in TOKENIZER_TYPES:
            raise ValueError(f"tokenizer.type is {self.type!r}; valid values: {', '.join(TOKENIZER_TYPES)}")
        n_min = BYTELEVEL_FIXED if self.type == "bytelevel_bpe" else fixed_pieces(self.byte_fallback)
        if self.path is None and self.vocab_size <= n_min:
            raise ValueError(
                f"tokenizer.vocab_size must exceed {n_min} (specials"
                f"{' + 256 byte pieces' if self.byte_fallback or self.type == 'bytelevel_bpe' else ''}), "
                f"got {self.vocab_size}"
            )
        if self.vocab_size > 1 << 32:
            raise ValueError(f"tokenizer.vocab_size too large: {self.vocab_size}")
        if self.path is None and self.vocab_size - n_min > self.sample_bytes:
            # each piece SentencePiece learns merges pieces of the sample (BPE) or is a substring kept for
            # its frequency in it (unigram): far fewer pieces than sampled bytes; refused before sampling
            raise ValueError(
                f"tokenizer.vocab_size={self.vocab_size} asks for more pieces than the {self.sample_bytes} bytes "
                f"of text they are learnt from (tokenizer.sample_bytes): set tokenizer.vocab_size well below that "
                f"(e.g. {suggested_vocab(self.sample_bytes, self.byte_fallback)}), or raise tokenizer.sample_bytes")
        if not 0.0 < self.character_coverage <= 1.0:
            raise ValueError(f"tokenizer.character_coverage must be in (0, 1], got {self.character_coverage}")
        if self.sample_bytes < 1:
            raise ValueError(f"tokenizer.sample_bytes must be >= 1, got {self.sample_bytes}")
        if self.heldout_bytes < 0:
            raise ValueError(f"tokenizer.heldout_bytes must be >= 0, got {self.heldout_bytes}")
        if self.num_threads < 0:
            raise ValueError(f"tokenizer.num_threads must be >= 0, got {self.num_threads}")


def fixed_pieces(byte_fallback: bool) -> int:
    """Pieces every vocabulary has whatever its text: the specials, and the 256 bytes with byte fallback."""
    return 4 + (256 if byte_fallback else 0)


def suggested_vocab(text_bytes: int, byte_fallback: bool = True) -> int:
    """A vocabulary size text of `text_bytes` bytes can give: the fixed pieces and one learnt piece per
    64 bytes, at most the default 8000 in all."""
    fixed = fixed_pieces(byte_fallback)
    return fixed + max(1, min(8000 - fixed, text_bytes // 64))
