"""Gemma GGUF tokenizers rebuilt as SentencePiece-style BPE.

transformers 4.57 turns a Gemma GGUF vocabulary into a Unigram model scored by the pieces' ranks, which
splits common words ("capital" -> "c ap it al"). Gemma's tokenizer is a SentencePiece BPE: a piece is
made by merging two smaller pieces, higher-scored (earlier) pieces first, with byte fallback. Rebuilding
that from the GGUF vocabulary tokenizes as the original does.
"""
from __future__ import annotations

from pathlib import Path

# Families whose GGUF tokenizer transformers builds as Unigram although the model was trained with BPE.
REBUILD_FAMILIES = frozenset({"gemma2", "gemma3", "gemma3_text"})
# SentencePiece piece types as stored in GGUF (tokenizer.ggml.token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # SentencePiece's visible space
# tokenizer argument -> GGUF metadata key (under tokenizer.ggml.) holding that token's id
SPECIAL_TOKEN_FIELDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                        "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


def spm_bpe_tokenizer(tokens: list[str], types: list[int], scores: list[float] | None, unk_id: int | None):
    """A ``tokenizers.Tokenizer`` doing SentencePiece BPE over this vocabulary (no BOS: the wrapper adds it)."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    # GGUF stores whitespace-only pieces with real spaces; SentencePiece writes them with its visible space.
    tokens = [SPACE * len(t) if t and not t.strip(" ") else t for t in tokens]
    vocab = {token: index for index, token in enumerate(tokens)}
    priority = {index: (-(scores[index] if scores else 0.0), index) for index in range(len(tokens))}
    mergeable = {token for token, kind in zip(tokens, types) if kind == NORMAL}
    merges = sorted(
        ((left, right, priority[vocab[piece]], vocab[left], vocab[right])
         for piece in mergeable
         for cut in range(1, len(piece))
         if (left := piece[:cut]) in mergeable and (right := piece[cut:]) in mergeable),
        key=lambda merge: merge[2:],
    )
    unk = tokens[unk_id] if unk_id is not None else None
    tokenizer = Tokenizer(BPE(vocab, [m[:2] for m in merges], unk_token=unk, fuse_unk=True, byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", SPACE)
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    # SentencePiece matches user-defined pieces in the normalized text (spaces already visible), as one piece.
    added = [AddedToken(t, special=kind == CONTROL, normalized=kind == USER_DEFINED)
             for t, kind in zip(tokens, types) if kind in (CONTROL, USER_DEFINED)]
    tokenizer.add_tokens(added)
    return tokenizer


def rebuild_gemma_tokenizer(gguf_path: Path):
    """A GemmaTokenizerFast over the SentencePiece BPE rebuilt from the vocabulary in ``gguf_path``."""
    from gguf import GGUFReader
    from transformers import GemmaTokenizerFast

    fields = GGUFReader(str(gguf_path)).fields

    def field(name: str, default=None):
        return fields[name].contents() if name in fields else default

    tokens = field("tokenizer.ggml.tokens")
    unk_id = field("tokenizer.ggml.unknown_token_id")
    backend = spm_bpe_tokenizer(tokens, field("tokenizer.ggml.token_type"), field("tokenizer.ggml.scores"), unk_id)
    special = {role: tokens[index] for role, key in SPECIAL_TOKEN_FIELDS.items()
               if (index := field(f"tokenizer.ggml.{key}")) is not None}
    return GemmaTokenizerFast(tokenizer_object=backend, **special, add_eos_token=False,
                              add_bos_token=bool(field("tokenizer.ggml.add_bos_token", True)))
