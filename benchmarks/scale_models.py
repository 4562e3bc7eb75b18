"""Random-weight models with real models' shapes, for timing and memory at scale (no hub: built from
transformers configs). The tokenizer is SmolLM2's (a real 49,152-token BPE, whose ids fit every
vocabulary here), so the calibration texts cut into as many tokens as a real model's would.

    python benchmarks/scale_models.py qwen2.5-1.5b-shape [--out DIR]   # prints the HF folder
    python benchmarks/scale_models.py qwen2.5-1.5b-shape --gguf FILE   # and writes it as a float32 GGUF
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from bench_common import ROOT  # noqa: F401  (puts the checkout on sys.path)

# name -> (transformers config class, its arguments): the published shapes of the models named.
SHAPES = {
    "qwen2.5-1.5b-shape": ("Qwen2Config", dict(
        hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, intermediate_size=8960,
        vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=True, rope_theta=1e6, bos_token_id=1, eos_token_id=2)),
    "llama3.2-3b-shape": ("LlamaConfig", dict(
        hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, intermediate_size=8192,
        vocab_size=128256, max_position_embeddings=4096, tie_word_embeddings=True, rope_theta=5e5, bos_token_id=1, eos_token_id=2)),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def build(name: str, out: Path, dtype: str = "float32") -> Path:
    """Write a random-weight HF folder of the named shape to ``out`` (reused if complete)."""
    import torch
    import transformers

    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    config_cls, kwargs = SHAPES[name]
    config = getattr(transformers, config_cls)(**kwargs)
    stage = out.with_name(out.name + ".partial")
    shutil.rmtree(stage, ignore_errors=True)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # bfloat16 halves the memory of building a 3B model
    try:
        model = transformers.AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(stage, max_shard_size="20GB")
    del model
    from exporters import export

    tokenizer_dir = Path(export("smollm2", log=lambda _: None))
    for file in TOKENIZER_FILES:
        shutil.copy2(tokenizer_dir / file, stage / file)
    shutil.rmtree(out, ignore_errors=True)
    stage.rename(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(SHAPES))
    parser.add_argument("--out", type=Path, help="folder to write (default: $CP_ONNX_CACHE/scale/NAME)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--gguf", type=Path, help="also write the folder as a float32 GGUF (llama.cpp's conventions) here")
    args = parser.parse_args()
    from exporters.pipeline import cache_root

    out = build(args.name, args.out or cache_root(None) / "scale" / args.name, args.dtype)
    print(out)
    if args.gguf:
        from hf_to_gguf import write_gguf

        print(write_gguf(out, args.gguf, name=args.name))


if __name__ == "__main__":
    sys.exit(main())
