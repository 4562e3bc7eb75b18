"""Tiny random-weight models of every supported family, built from transformers configs and
exported with Optimum inside the tests (no hub). Cached per test session under a temp folder."""
from __future__ import annotations

from pathlib import Path

# family -> (config class name, config kwargs, model class name, kind)
TINY = {
    "llama": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2), "LlamaForCausalLM", "decoder"),
    "mistral": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=None), "MistralForCausalLM", "decoder"),
    "qwen2": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2), "Qwen2ForCausalLM", "decoder"),
    "gemma3": ("Gemma3TextConfig", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16, query_pre_attn_scalar=16), "Gemma3ForCausalLM", "decoder"),
    "phi3": ("Phi3Config", dict(num_attention_heads=4, num_key_value_heads=4, pad_token_id=0), "Phi3ForCausalLM", "decoder"),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=3, n_head=4, n_positions=128), "GPT2LMHeadModel", "decoder"),
    "gpt_neox": ("GPTNeoXConfig", dict(num_attention_heads=4, rotary_pct=0.5), "GPTNeoXForCausalLM", "decoder"),
    # GPT-NeoX without the parallel residual: attention and MLP each add to the stream (Pythia-style configs vary).
    "gpt_neox_sequential": ("GPTNeoXConfig", dict(num_attention_heads=4, rotary_pct=0.5, use_parallel_residual=False), "GPTNeoXForCausalLM", "decoder"),
    "bert": ("BertConfig", dict(num_attention_heads=4), "BertForMaskedLM", "encoder"),
}

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, max_position_embeddings=128)


def build_hf_model(family: str, out_dir: Path, seed: int = 0):
    """Build a tiny random model of ``family`` and save it (weights + config) to ``out_dir``."""
    import torch
    import transformers

    config_cls, extra, model_cls, _ = TINY[family]
    kwargs = dict(COMMON) if family != "gpt2" else dict(vocab_size=COMMON["vocab_size"])
    kwargs.update(extra)
    config = getattr(transformers, config_cls)(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    model.save_pretrained(out_dir)
    return model


def write_byte_tokenizer(folder: Path) -> Path:
    """A byte-level tokenizer.json whose 256 ids cover the tiny models' vocabulary (no merges, no BOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    path = Path(folder) / "tokenizer.json"
    tokenizer.save(str(path))
    return path
