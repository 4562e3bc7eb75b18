"""The tests' shared helpers: every plain function, constant and small class that more than one test file uses (fixtures
shared by several files are in conftest.py, which pytest finds without imports). No test file imports another test
file; none imports benchmarks/. Heavy imports (torch, transformers, cp_onnx's analysis) stay inside the functions, so
that conftest.py, which imports this module, stays quick to load."""
from __future__ import annotations

import contextlib
import json
import shutil
import struct
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from cp_onnx.models.scoring import ProbeItem

# --- tiny random-weight models of every supported family, built from transformers configs (no hub) ---

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


def write_tiny_folder(tiny_model, family: str, folder: Path) -> Path:
    """A folder with a tiny model's model.onnx and a byte-level tokenizer.json (``tiny_model``: the session fixture)."""
    _, onnx_path = tiny_model(family)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(onnx_path, folder / "model.onnx")
    write_byte_tokenizer(folder)
    return folder


TINY_SETTINGS = dict(n=6, block_sizes=(1, 2))
TINY_ARGS = ["-n", "6", "--block-sizes", "1,2"]  # the same settings on the command line


def tiny_report(folder: Path, **settings) -> dict:
    """The report `cp-onnx analyze` would write for a tiny model folder."""
    from cp_onnx.analyze import Settings, analyze
    from cp_onnx.models.model import open_model

    return analyze(open_model(folder), Settings(**(TINY_SETTINGS | settings)), log=lambda _: None)


def run(args, capsys):
    """``cp-onnx ARGS`` in this process: (exit code, stdout, stderr)."""
    from cp_onnx.cli import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def quiet(message) -> None:
    """A log that drops every line."""


# --- tokenizers for exported folders ---

CORPUS = [
    "The capital of France is Paris.", "If 4y - 9 = 23, what is y?", "A baker makes 48 rolls and sells them.",
    "the quick brown fox jumps over the lazy dog", "Hello world! How are you today?",
]
SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2


def tiny_tokenizer():
    """A byte-level BPE (printable ASCII, merges trained on CORPUS) that does NOT add BOS by itself."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = [chr(c) for c in range(33, 127)] + ["\u0120"]  # byte-level spelling of ASCII, "Ġ" is the space
    trainer = trainers.BpeTrainer(vocab_size=160, special_tokens=SPECIALS, initial_alphabet=alphabet,
                                  limit_alphabet=len(alphabet), show_progress=False)
    tokenizer.train_from_iterator(CORPUS * 3, trainer)
    return tokenizer


def save_tokenizer(folder: Path, tokenizer) -> None:
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(folder)


# The texts of test_deployed_graphs, which save_bpe_tokenizer's tokenizer is trained on.
DEPLOYED_TEXTS = ["The capital of France is Paris.", "12 + 35 = 47, and 47 - 12 = 35.", "Hello world"]


def save_bpe_tokenizer(folder: Path) -> None:
    """A small BPE tokenizer (ids below the tiny models' vocabulary of 256) saved with its config files, as the builder needs."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tokenizer.train_from_iterator([string.printable, *DEPLOYED_TEXTS] * 8, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(folder)


# --- the torch side: modules, layer lists, logits ---

# family -> (decoder layers, module whose input (or output, for BERT's post-LN) is resid_mid, output projection)
MODULES = {
    "llama": ("model.layers", ("post_attention_layernorm", "input"), "self_attn.o_proj"),
    "mistral": ("model.layers", ("post_attention_layernorm", "input"), "self_attn.o_proj"),
    "qwen2": ("model.layers", ("post_attention_layernorm", "input"), "self_attn.o_proj"),
    "phi3": ("model.layers", ("post_attention_layernorm", "input"), "self_attn.o_proj"),
    "gemma3": ("model.layers", ("pre_feedforward_layernorm", "input"), "self_attn.o_proj"),
    "gpt2": ("transformer.h", ("ln_2", "input"), "attn.c_proj"),
    "gpt_neox": ("gpt_neox.layers", None, "attention.dense"),  # parallel residual: no resid_mid
    "gpt_neox_sequential": ("gpt_neox.layers", ("post_attention_layernorm", "input"), "attention.dense"),
    "bert": ("bert.encoder.layer", ("attention.output", "output"), "attention.output.dense"),
}
TEXT_LENGTHS = (9, 5)


def rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def token_batch(side: str, vocab: int = 256, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    from cp_onnx.models.runner import pad_batch

    rng = np.random.default_rng(seed)
    return pad_batch([rng.integers(3, vocab, size=n).tolist() for n in TEXT_LENGTHS], side=side)


def module(root, path: str):
    for part in path.split("."):
        root = getattr(root, part)
    return root


@contextlib.contextmanager
def repeated_layers(hf, family: str, path):
    """The torch model running its layers along ``path`` (same modules, so shared weights), restored on exit."""
    import torch

    owner_path, _, attribute = MODULES[family][0].rpartition(".")
    owner = module(hf, owner_path)
    layers, count = getattr(owner, attribute), hf.config.num_hidden_layers
    setattr(owner, attribute, torch.nn.ModuleList([layers[i] for i in path]))
    hf.config.num_hidden_layers = len(path)  # Llama and Gemma3 iterate over layers[:num_hidden_layers]
    try:
        yield hf
    finally:
        setattr(owner, attribute, layers)
        hf.config.num_hidden_layers = count


def torch_logits(hf, feeds: dict) -> np.ndarray:
    """Logits of the ONNX graph's ``feeds`` (numpy) under torch, without a cache."""
    import torch

    with torch.no_grad():
        return hf(**{name: torch.from_numpy(value) for name, value in feeds.items()}, use_cache=False).logits.numpy()


def torch_ids_logits(model, ids: list[int]) -> np.ndarray:
    """Logits [seq, vocab] of one text's token ids under torch."""
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def torch_generate(hf, ids: list[int], path: list[int], new_tokens: int) -> list[int]:
    """The tiny llama's greedy continuation under torch with the layers of ``path``."""
    import torch

    with repeated_layers(hf, "llama", path), torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=new_tokens,
                          do_sample=False, use_cache=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


_TORCH_LOGPROBS: dict = {}


def torch_token_logprob(hf, tokens: list[int], path: list[int] | None, position: int) -> float:
    """Log-probability of tokens[position] under torch with ``path``'s layers run in order (memoised per model, sequence and path)."""
    import torch

    key = (id(hf), tuple(tokens), None if path is None else tuple(path))
    if key not in _TORCH_LOGPROBS:
        model = hf.model
        layers, count = model.layers, hf.config.num_hidden_layers
        if path is not None:
            model.layers, hf.config.num_hidden_layers = torch.nn.ModuleList([layers[k] for k in path]), len(path)
        try:
            with torch.no_grad():
                logits = hf(torch.tensor([tokens]), use_cache=False).logits[0].double()
        finally:
            model.layers, hf.config.num_hidden_layers = layers, count
        _TORCH_LOGPROBS[key] = torch.log_softmax(logits, dim=-1)
    return _TORCH_LOGPROBS[key][position - 1, tokens[position]].item()


# family -> (decoder layers, output projection whose input holds the heads' contexts side by side)
HEAD_PROJECTIONS = {"llama": ("model.layers", "self_attn.o_proj"), "gpt2": ("transformer.h", "attn.c_proj")}
TEXT_IDS = [5, 7, 9, 11, 13, 17, 19, 23]  # the one text of the perturbation tests


def hooked_torch_logits(hf, family: str, *, ids=TEXT_IDS, resid: dict | None = None, heads: dict | None = None,
                        layer_outputs: list | None = None) -> np.ndarray:
    """Logits of ``ids`` with ``resid[l]`` added to layer l's input and ``heads[l] = (scale [H], shift [H, S or 1, D])``
    applied to its projection input; each layer's output is appended to ``layer_outputs`` if given."""
    import torch

    layers_path, proj_path = HEAD_PROJECTIONS[family]
    layers = module(hf, layers_path)
    dtype = next(hf.parameters()).dtype
    handles = []
    for l, delta in (resid or {}).items():
        def add(mod, args, kwargs, delta=torch.tensor(delta, dtype=dtype)):
            if args:
                return (args[0] + delta, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + delta}
        handles.append(layers[l].register_forward_pre_hook(add, with_kwargs=True))
    for l, (scale, shift) in (heads or {}).items():
        def change(mod, args, scale=torch.tensor(scale, dtype=dtype), shift=torch.tensor(shift, dtype=dtype)):
            b, s, width = args[0].shape
            ctx = args[0].reshape(b, s, len(scale), width // len(scale)).transpose(1, 2)
            ctx = ctx * scale[None, :, None, None] + shift[None]
            return (ctx.transpose(1, 2).reshape(b, s, width),)
        handles.append(module(layers[l], proj_path).register_forward_pre_hook(change))
    if layer_outputs is not None:
        for layer in layers:
            handles.append(layer.register_forward_hook(lambda mod, args, out: layer_outputs.append((out[0] if isinstance(out, tuple) else out)[0].numpy())))
    try:
        with torch.no_grad():
            return hf(input_ids=torch.tensor([ids])).logits[0].numpy()
    finally:
        for handle in handles:
            handle.remove()


def log_probs(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


# --- exported folders: their logits on texts ---

EXPORT_TEXTS = ["The capital of France is", "If 4y - 9 = 23, what is y?", "the lazy dog jumps over the quick brown fox"]


def onnx_logits(folder: Path, ids: list[int], graph: str = "model.onnx") -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / graph), providers=["CPUExecutionProvider"])
    feed = {"input_ids": np.array([ids], dtype=np.int64), "attention_mask": np.ones((1, len(ids)), dtype=np.int64),
            "position_ids": np.arange(len(ids), dtype=np.int64)[None], "token_type_ids": np.zeros((1, len(ids)), np.int64)}
    return session.run(["logits"], {k: v for k, v in feed.items() if k in {i.name for i in session.get_inputs()}})[0][0]


def plain_ids(folder: Path, text: str) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids


def assert_close(actual: np.ndarray, expected: np.ndarray, rel: float = 1e-4) -> None:
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() <= rel * np.abs(expected).max()


# --- probe items and general texts ---

ITEMS = [
    ProbeItem("a-0", "arithmetic", "Q: 2+3=", " 5"),
    ProbeItem("a-1", "arithmetic", "Q: 17+1=", " 18"),
    ProbeItem("s-0", "syllogism", "All A are B. x is A. Is x B?", " yes", (" yes", " no")),
    ProbeItem("s-1", "syllogism", "No A are B. x is A. Is x B?", " no", (" yes", " no")),
    ProbeItem("o-0", "ordering", "Ann > Bob > Cy. Who is first?", " Ann", (" Bob", " Ann", " Cy")),
    ProbeItem("c-0", "comparison", "Which is larger, 1 or 2?", " 2", (" 1", " 2")),  # bytes " ", "1" and " ", "2": one sequence
]
# The same questions with solved examples of their kind first (few-shot); one kind keeps none (zero-shot only).
SHOTS = {"arithmetic": "Q: 1+1= 2\n", "syllogism": "All C are D. y is C. Is y D? yes\n", "ordering": "Di > Ed. Who is first? Di\n"}
SHOT_ITEMS = [replace(item, shots=SHOTS.get(item.kind, "")) for item in ITEMS]
GENERAL = ["The harbour was quiet in the early morning.", "Gulls circled over the nets."]


# --- the reference implementation's own outputs on SmolLM2 (copied from shared/fixtures) ---

REFERENCE_SMOLLM2 = Path(__file__).parent / "fixtures" / "reference_smollm2.json"
TIE_TOL = 1e-3  # blocks whose reference scores lie this close may trade places


def load_reference() -> dict:
    if not REFERENCE_SMOLLM2.exists():
        pytest.skip(f"reference fixture {REFERENCE_SMOLLM2} is not available")
    return json.loads(REFERENCE_SMOLLM2.read_text())


def reference_stats(reference: dict) -> dict[str, np.ndarray]:
    rows = reference["layer_stats"]
    return {name: np.array([row[name] for row in rows]) for name in rows[0] if name != "layer_idx"}


def assert_same_top(got, expected: list[dict], top: int = 10) -> None:
    """The first `top` blocks agree, except blocks whose reference scores lie within TIE_TOL may swap."""
    ref_score = {(r["start"], r["end"]): r["score"] for r in expected}
    for rank, (block, ref) in enumerate(zip(got[:top], expected[:top])):
        if (block.start, block.end) != (ref["start"], ref["end"]):
            assert abs(ref_score[(block.start, block.end)] - ref["score"]) <= TIE_TOL, (
                f"rank {rank}: got [{block.start}, {block.end}), reference [{ref['start']}, {ref['end']})"
            )


# --- predictions as a report holds them, written by hand ---

def _block(start, end, gain, lower, general):
    return {"start": start, "end": end, "score": gain,
            "metrics": {"gain_lower_bound": lower, "text_nll_change": 0.3, "general_nll_change": general}}


ABSTAIN = {"method": "duplication_loss", "regime": "few_shot", "decision": "abstain", "block": None, "confidence": 0.95,
           "reason": "no block's gain is above zero in 95% of 2000 resamples of the texts",
           "predicted_gain": 0.1266, "gain_lower_bound": -0.0079,
           "candidates": [_block(9, 14, 0.1266, -0.0079, 0.2297), _block(9, 13, 0.1123, 0.0025, 0.1591)],
           "metric": "answer log-probability (digit tokens)", "gain_per": "digit token"}
HELP = {**ABSTAIN, "decision": "help", "block": {"start": 9, "end": 14}, "gain_lower_bound": 0.0123, "reason": "sure"}
ZERO = {**HELP, "regime": "zero_shot", "metric": "answer log-probability (the stated answer)", "gain_per": "question"}


# --- outside programs: headless Chromium, the C++ example's toolchain (conftest.py's fixture `reader` builds it) ---

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def rendered_dom(page: Path, tmp_path: Path) -> str:
    profile = tmp_path / "chromium-profile"
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", "--dump-dom", page.resolve().as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


JSON_HEADER = Path("/usr/include/nlohmann/json.hpp")


def cpp_tools_missing() -> str | None:
    """Why the C++ example cannot be built here (a tool or nlohmann/json missing), or None."""
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (CI installs it; locally: apt-get install cmake g++)"
    if not JSON_HEADER.is_file():
        return "nlohmann/json is not installed (CI installs it; locally: apt-get install nlohmann-json3-dev)"
    return None


def run_reader(reader: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(reader), *map(str, args)], capture_output=True, text=True)


# --- GGUF files: small ones written by the gguf package, and where each field of a file lies, found by the gguf
# package's own reader (independent of exporters.gguf_header, which they test) ---

GGUF_HEADER = 24  # magic, version, tensor count (at 8), key-value count (at 16)


def small_gguf(path: Path, *, extra: dict | None = None, big_endian: bool = False, alignment: int | None = None) -> Path:
    """A two-tensor llama GGUF (one block, hidden 8, four tokens) with ``extra`` metadata (key -> value) added."""
    import gguf

    endian = gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE
    writer = gguf.GGUFWriter(str(path), "llama", endianess=endian)
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_token_list(["<s>", "a", "b", "c"])
    writer.add_uint32("test.first", 1)
    writer.add_uint32("test.other", 2)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for key, value in (extra or {}).items():
        writer.add_array(key, value) if isinstance(value, list) else writer.add_string(key, value)
    for name, shape in (("token_embd.weight", (4, 8)), ("blk.0.attn_q.weight", (8, 8))):  # the writer swaps bytes for big-endian
        writer.add_tensor(name, np.arange(np.prod(shape), dtype=np.float32).reshape(shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


@dataclass(frozen=True)
class Place:
    """Where one number of the header lies: its byte offset and struct format."""

    offset: int
    code: str


def places(path: Path) -> dict[str, list[Place]]:
    """The header's numbers by role, located with gguf.GGUFReader (little-endian files): counts, key and string
    lengths, value types, array counts and item types, scalar values, tensor dimension counts, dims, types, offsets."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(path))
    found: dict[str, list[Place]] = {"tensor_count": [Place(8, "Q")], "kv_count": [Place(16, "Q")], "version": [Place(4, "I")]}

    def add(role: str, offset: int, part) -> None:
        found.setdefault(role, []).append(Place(offset, {1: "B", 2: "H", 4: "I", 8: "Q"}[part.dtype.itemsize]))

    for name, fld in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        at = fld.offset
        offsets = []
        for part in fld.parts:
            offsets.append(at)
            at += part.nbytes
        add("key_length", offsets[0], fld.parts[0])
        add("value_type", offsets[2], fld.parts[2])
        main = fld.types[0]
        if main == GGUFValueType.STRING:
            add("string_length", offsets[3], fld.parts[3])
        elif main == GGUFValueType.ARRAY:
            add("array_item_type", offsets[3], fld.parts[3])
            add("array_count", offsets[4], fld.parts[4])
            if fld.types[-1] == GGUFValueType.STRING:
                add("string_length", offsets[5], fld.parts[5])
        elif fld.parts[3].dtype.itemsize in (1, 2, 4, 8) and fld.parts[3].dtype.kind in "iu":
            add("scalar", offsets[3], fld.parts[3])
    for tensor in reader.tensors:
        at = tensor.field.offset
        offsets = []
        for part in tensor.field.parts:
            offsets.append(at)
            at += part.nbytes
        name_length, _, n_dims, dims, kind, offset = zip(offsets, tensor.field.parts)
        for role, (where, part) in (("name_length", name_length), ("n_dims", n_dims), ("tensor_type", kind), ("tensor_offset", offset)):
            add(role, where, part)
        for k in range(len(dims[1])):
            found.setdefault("dim", []).append(Place(dims[0] + 8 * k, "Q"))
    return found


def put(data: bytearray, place: Place, value: int) -> None:
    """Write ``value`` (wrapped to the field's width) at ``place``."""
    bits = 8 * struct.calcsize(place.code)
    struct.pack_into("<" + place.code, data, place.offset, value % (1 << bits))


def get(data: bytes, place: Place) -> int:
    return struct.unpack_from("<" + place.code, data, place.offset)[0]
