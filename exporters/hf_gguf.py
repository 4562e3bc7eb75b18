"""A float32 GGUF from a Hugging Face folder (llama or qwen2), written as llama.cpp's convert_hf_to_gguf.py
would: its tensor names, its metadata keys, q/k rotary-permuted for llama only, and the folder's
tokenizer.json as a gpt2-type BPE (tokens padded to the vocabulary size with [PADn], merges, token
types, special ids). Tensors are read from the safetensors one at a time and written as they come, so
a 6 GB model is never held twice (nor once) in memory. The tests make their GGUF sources with it (tiny
models; cp-onnx's GGUF output is checked against them), benchmarks/scale_models.py models with real shapes.
torch (to read bfloat16 safetensors) is imported only when a tensor is read.

    python benchmarks/hf_to_gguf.py HF_FOLDER OUT.gguf
"""
from __future__ import annotations

import json
import math
from pathlib import Path

# config.json model_type -> (GGUF architecture, whether llama.cpp interleaves the rotary halves of q and k)
ARCHITECTURES = {"llama": ("llama", True), "qwen2": ("qwen2", False)}
# GGUF key (under tokenizer.ggml.) -> tokenizer_config.json entry naming that token, and config.json's id of it
SPECIAL_TOKENS = {"bos_token_id": "bos_token", "eos_token_id": "eos_token", "unknown_token_id": "unk_token",
                  "padding_token_id": "pad_token"}


def write_gguf(folder: Path, path: Path, *, add_bos: bool | None = None, name: str | None = None) -> Path:
    """Write ``folder`` (config.json, *.safetensors, tokenizer.json) as a float32 GGUF at ``path``.

    ``add_bos``: the tokenizer.ggml.add_bos_token flag; None takes tokenizer_config.json's add_bos_token
    (not written when it has none), as llama.cpp does.
    """
    import gguf
    import numpy as np

    folder, path = Path(folder), Path(path)
    stage = path.with_name(path.name + ".partial")  # a run cut short leaves no file that looks complete
    config = json.loads((folder / "config.json").read_text())
    if config["model_type"] not in ARCHITECTURES:
        raise ValueError(f"{folder}: model_type {config['model_type']} is not one of {', '.join(ARCHITECTURES)}")
    arch, permute = ARCHITECTURES[config["model_type"]]
    writer = gguf.GGUFWriter(str(stage), arch)
    write_metadata(writer, config, name or folder.name)
    write_tokenizer(writer, folder, config, add_bos)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config["num_hidden_layers"])
    tensors = list(weight_tensors(folder, config))
    for hf_name, (shape, _) in tensors:
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"{folder}: no GGUF name for the tensor {hf_name}")
        writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32), 4 * math.prod(shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    n_head = config["num_attention_heads"]
    heads = {"q_proj.weight": n_head, "k_proj.weight": config.get("num_key_value_heads") or n_head}
    for hf_name, (_, load) in tensors:  # in the order of the tensor infos: the writer pops them first to last
        weights = load()
        for projection, count in heads.items():
            if permute and hf_name.endswith(projection):  # llama.cpp interleaves the rotary halves of each head
                weights = weights.reshape(count, 2, -1, weights.shape[1]).swapaxes(1, 2).reshape(weights.shape)
        writer.write_tensor_data(weights)
        del weights
    writer.close()
    stage.rename(path)
    return path


def write_metadata(writer, config: dict, name: str) -> None:
    """The hyperparameters llama.cpp writes for llama / qwen2 models (general.file_type: all float32)."""
    heads = config["num_attention_heads"]
    writer.add_name(name)
    writer.add_file_type(0)  # LlamaFileType.ALL_F32
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // heads)
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])


def write_tokenizer(writer, folder: Path, config: dict, add_bos: bool | None) -> None:
    """tokenizer.json as llama.cpp's gpt2 vocabulary: one token per id up to vocab_size ([PADn] where the
    tokenizer has none), added tokens CONTROL when special else USER_DEFINED, merges as "left right"."""
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    if spec["model"]["type"] != "BPE":
        raise ValueError(f"{folder}/tokenizer.json is a {spec['model']['type']} tokenizer, not a BPE one")
    by_id = {index: token for token, index in spec["model"]["vocab"].items()}
    added = {entry["id"]: entry for entry in spec.get("added_tokens", [])}
    by_id.update({index: entry["content"] for index, entry in added.items()})
    size = max(config["vocab_size"], max(by_id) + 1)
    tokens, types = [], []
    for index in range(size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(5)  # TokenType.UNUSED
        else:
            tokens.append(by_id[index])
            types.append((3 if added[index]["special"] else 4) if index in added else 1)  # CONTROL / USER_DEFINED / NORMAL
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    tokenizer_config = folder / "tokenizer_config.json"
    settings = json.loads(tokenizer_config.read_text()) if tokenizer_config.is_file() else {}
    ids = {token: index for index, token in enumerate(tokens)}
    for key, entry in SPECIAL_TOKENS.items():  # tokenizer_config.json's names first, config.json's ids for the rest
        named = settings.get(entry)
        named = named.get("content") if isinstance(named, dict) else named
        index = ids.get(named) if named is not None else config.get(entry + "_id")
        if isinstance(index, int):
            writer.add_uint32(f"tokenizer.ggml.{key}", index)
    add_bos = settings.get("add_bos_token") if add_bos is None else add_bos
    if add_bos is not None:
        writer.add_add_bos_token(bool(add_bos))


def weight_tensors(folder: Path, config: dict):
    """(name, (shape, load)) of each weight in the folder's safetensors, load() giving a float32 numpy array.
    A tied lm_head is left out (llama.cpp writes no output tensor then), as are rotary caches."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder} has no .safetensors file")
    tied = config.get("tie_word_embeddings", False)
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
                    continue
                shape = tuple(handle.get_slice(key).get_shape())
                yield key, (shape, lambda file=file, key=key: load_tensor(file, key))


def load_tensor(file: Path, key: str):
    """One tensor of a safetensors file as float32 numpy (bfloat16 and float16 files too)."""
    import torch
    from safetensors import safe_open

    with safe_open(file, framework="pt") as handle:
        return handle.get_tensor(key).to(torch.float32).numpy()
