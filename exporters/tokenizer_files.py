"""Tokenizer files of a model folder: loaded with transformers, saved with save_pretrained, and checked so
that plain ``tokenizers.Tokenizer.from_file(tokenizer.json)`` (what cp_onnx uses) gives the same ids,
with exactly one BOS for the families that need it."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .errors import ExportError
from .gguf_tokenizer import REBUILD_FAMILIES, rebuild_gemma_tokenizer
from .sources import Source

# Families trained with a BOS token in front of every text: without it their outputs degrade.
NEEDS_BOS = frozenset({"llama", "mistral", "gemma", "gemma2", "gemma3", "gemma3_text"})
# Texts on which the saved tokenizer.json must agree with transformers (spaces, digits, punctuation, newline).
PROBE_TEXTS = (
    "The capital of France is",
    "If 4y - 9 = 23, what is y?",
    "  two leading spaces,\nand a new line.",
)
SAVED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def load_tokenizer(source: Source, family: str):
    """The source's fast tokenizer (from the GGUF itself for GGUF sources); ExportError if there is none."""
    from transformers import AutoTokenizer

    try:
        if source.is_gguf and family in REBUILD_FAMILIES:
            return rebuild_gemma_tokenizer(source.path)
        if source.is_gguf:
            tokenizer = AutoTokenizer.from_pretrained(source.path.parent, gguf_file=source.path.name, local_files_only=True)
        else:
            tokenizer = AutoTokenizer.from_pretrained(source.path, use_fast=True, local_files_only=True)
    except Exception as err:  # the files are the user's: transformers and tokenizers raise any type on a damaged one
        raise ExportError(
            f"{source.path} has no usable tokenizer ({first_line(err)}); add tokenizer.json or tokenizer.model"
        ) from err
    if not getattr(tokenizer, "is_fast", False):
        raise ExportError(f"{source.path}: transformers gives no fast tokenizer, so no tokenizer.json; add a tokenizer.json")
    return tokenizer


def gguf_bos(gguf_path: Path) -> int | None:
    """The BOS id a GGUF asks for in front of every text (tokenizer.ggml.add_bos_token true, as llama.cpp reads
    it), else None. transformers drops that flag for most families (qwen2 among them)."""
    from .gguf_header import ArrayValue, read_header

    metadata = read_header(gguf_path).metadata  # its values as read, type-checked here
    wanted, bos = metadata.get("tokenizer.ggml.add_bos_token"), metadata.get("tokenizer.ggml.bos_token_id")
    if not (isinstance(wanted, (bool, int)) and wanted) or bos is None:
        return None
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab = tokens.count if isinstance(tokens, ArrayValue) else float("inf")
    if not isinstance(bos, int) or isinstance(bos, bool) or not 0 <= bos < vocab:
        raise ExportError(f"{gguf_path} asks for a BOS token (tokenizer.ggml.add_bos_token) but its tokenizer.ggml.bos_token_id is "
                          f"{str(bos)[:40]}; the file is damaged: download or convert the GGUF again")
    return bos


def save_tokenizer(tokenizer, folder: Path, family: str, config_bos_id: int | None, log: Callable[[str], None],
                   gguf_bos_id: int | None = None) -> dict:
    """Save the tokenizer files into ``folder`` (adding BOS where the family needs it, or the GGUF it came
    from asks for it: ``gguf_bos_id``, see gguf_bos) and check them.

    Returns the manifest fields ``bos_token_id`` and ``add_bos``.
    """
    bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else config_bos_id
    bos_id = gguf_bos_id if gguf_bos_id is not None else bos_id
    needs_bos = family in NEEDS_BOS or gguf_bos_id is not None
    if needs_bos:
        if bos_id is None:
            raise ExportError(f"{family} models need a BOS token but neither the tokenizer nor config.json names one; "
                              "add bos_token_id to config.json")
        if not starts_with_bos(tokenizer(PROBE_TEXTS[0]).input_ids, bos_id):
            why = "the GGUF asks for (tokenizer.ggml.add_bos_token)" if gguf_bos_id is not None else f"{family} models need"
            log(f"the tokenizer does not prepend BOS (id {bos_id}), which {why}: adding it")
            prepend_bos(tokenizer, bos_id)
    tokenizer.save_pretrained(folder)
    missing = [name for name in SAVED_FILES if not (Path(folder) / name).is_file()]
    if missing:
        raise ExportError(f"transformers did not write {', '.join(missing)} for this tokenizer; the model cannot be exported")
    return check_saved_tokenizer(folder, family, bos_id, needs_bos)


def check_saved_tokenizer(folder: Path, family: str, bos_id: int | None, needs_bos: bool) -> dict:
    """Check tokenizer.json alone encodes like transformers reloading the folder, with BOS at most once."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    plain = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    reloaded = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    for text in PROBE_TEXTS:
        ids, expected = plain.encode(text).ids, reloaded(text).input_ids
        if ids != expected:
            raise ExportError(f"tokenizer.json encodes {text!r} as {ids[:8]}... but transformers as {expected[:8]}...; report this model")
        if bos_id is not None and ids[:2] == [bos_id, bos_id]:
            raise ExportError(f"the tokenizer prepends BOS (id {bos_id}) twice; "
                              "fix add_bos_token / the post-processor in its tokenizer files")
    add_bos = bos_id is not None and starts_with_bos(plain.encode(PROBE_TEXTS[0]).ids, bos_id)
    if needs_bos and not add_bos:
        raise ExportError(f"the saved tokenizer does not prepend BOS (id {bos_id}), which this {family} model needs; report this model")
    return {"bos_token_id": bos_id, "add_bos": add_bos}


def starts_with_bos(ids: list[int], bos_id: int) -> bool:
    """Whether ``ids`` start with exactly one BOS."""
    return ids[:1] == [bos_id] and ids[1:2] != [bos_id]


def prepend_bos(tokenizer, bos_id: int) -> None:
    """Make the tokenizer (and the tokenizer.json it saves) put one BOS in front of every text."""
    from tokenizers import processors

    if isinstance(getattr(type(tokenizer), "add_bos_token", None), property):
        tokenizer.add_bos_token = True  # Llama/Gemma fast tokenizers rebuild their post-processor from this flag
    else:
        bos = tokenizer.convert_ids_to_tokens(bos_id)
        if tokenizer.bos_token is None:
            tokenizer.bos_token = bos  # so that special_tokens_map.json names it
        template = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )
        backend = tokenizer.backend_tokenizer
        existing = backend.post_processor
        backend.post_processor = template if existing is None else processors.Sequence([existing, template])
    if not starts_with_bos(tokenizer(PROBE_TEXTS[0]).input_ids, bos_id):
        raise ExportError(f"could not make this {type(tokenizer).__name__} prepend BOS; add a BOS post-processor to tokenizer.json")


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (library errors are often long)."""
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:300]
