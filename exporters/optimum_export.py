"""The Optimum call and the transformers loading around it: the only place in cp-onnx that imports torch
(lazily, inside the functions)."""
from __future__ import annotations

import math
import warnings
from pathlib import Path

from .errors import ExportError
from .tokenizer_files import first_line

# The task Optimum is asked for, by whether the model is a decoder (causal LM) or an encoder.
TASK_NO_PAST = {"decoder": "text-generation", "encoder": "fill-mask"}
TASK_WITH_PAST = "text-generation-with-past"
# Model class name suffix -> kind of model (config.architectures names the class the weights were saved from).
KIND_BY_CLASS_SUFFIX = {"ForCausalLM": "decoder", "LMHeadModel": "decoder", "ForMaskedLM": "encoder"}
OPSET = 18


def export_hf_folder(model_dir: Path, out_dir: Path, *, with_past: bool = False, kind: str = "decoder", model=None) -> Path:
    """Export a Hugging Face model folder to ``out_dir/model.onnx`` with Optimum (opset 18, fp32, CPU).

    ``model``: the folder's model already in memory (a dequantized GGUF, whose folder then holds only its
    config): exported as Optimum's main_export would after loading it, without a float32 copy on disk.
    """
    from optimum.exporters.onnx import main_export, onnx_export_from_model  # imports torch

    task = TASK_WITH_PAST if with_past else TASK_NO_PAST[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python control flow: expected for these models
        if model is None:
            main_export(
                str(model_dir),
                output=str(out_dir),
                task=task,
                opset=OPSET,
                device="cpu",
                dtype="fp32",
                do_validation=False,
                no_post_process=True,
                local_files_only=True,
            )
        else:
            model.config.use_cache = with_past  # what main_export sets for a task named without / with past
            onnx_export_from_model(model=model, output=str(out_dir), task=task, opset=OPSET, device="cpu",
                                   do_validation=False, no_post_process=True)
    return Path(out_dir) / "model.onnx"


def load_config(model_dir: Path):
    """The transformers config of a model folder."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except Exception as err:  # a damaged config.json raises any type inside transformers
        raise ExportError(f"transformers cannot read {Path(model_dir) / 'config.json'} ({first_line(err)}); is it a supported model?") from err


def model_kind(config) -> str:
    """'decoder' or 'encoder', after checking Optimum can export this architecture for that task."""
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs with the TasksManager)
    from optimum.exporters.tasks import TasksManager

    family = config.model_type
    try:
        tasks = TasksManager.get_supported_tasks_for_model_type(family, "onnx", library_name="transformers")
    except KeyError as err:
        raise ExportError(f"Optimum cannot export {family} models to ONNX ({first_line(err)[:120]}...); "
                          "use a supported architecture") from None
    classes = config.architectures or []
    kinds = [kind for name in classes for suffix, kind in KIND_BY_CLASS_SUFFIX.items() if name.endswith(suffix)]
    kind = kinds[0] if kinds else ("decoder" if TASK_NO_PAST["decoder"] in tasks else "encoder")
    if TASK_NO_PAST[kind] not in tasks:
        raise ExportError(f"Optimum cannot export {family} models for {TASK_NO_PAST[kind]} (only {', '.join(tasks)}); "
                          "use a causal or masked LM")
    return kind


def dequantize_gguf(gguf_path: Path, out_dir: Path, *, save_weights: bool = True):
    """Load a GGUF with transformers (dequantized to float32) and save it as a Hugging Face folder.

    Without ``save_weights`` only the config files are written and the model is returned instead: a
    1.5B model's float32 weights are 6 GB of disk that Optimum would only read back.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)
        check_declared_size(gguf_path, config)
        model = AutoModelForCausalLM.from_pretrained(  # given the config, transformers does not read the metadata again
            gguf_path.parent, gguf_file=gguf_path.name, config=config, dtype=torch.float32, local_files_only=True
        )
    except ExportError:
        raise
    except Exception as err:  # a header that passed gguf_header can still hold values transformers cannot use (any exception type)
        raise ExportError(f"transformers cannot load {gguf_path} ({first_line(err)}); use a GGUF of a supported architecture") from err
    if save_weights:
        model.save_pretrained(out_dir)
        return None
    model.config.save_pretrained(out_dir)
    if model.can_generate():
        model.generation_config.save_pretrained(out_dir)
    model.config._name_or_path = str(out_dir)  # Optimum looks for preprocessors there (there are none)
    return model


def check_declared_size(gguf_path: Path, config) -> None:
    """ExportError when the model transformers would build from the GGUF's metadata (``config``) has more parameters and buffers than
    the file's tensors hold (gguf_header.DECLARED_SLACK times): it would allocate the rest (a rope dimension of 2**31 in
    a 600 kB file asked for 2.2 TB). The model is built on torch's meta device, which allocates nothing, so every
    architecture's own use of its metadata is counted, not an estimate of it."""
    import torch
    from transformers import AutoModelForCausalLM

    from .gguf_header import DECLARED_SLACK, read_header

    held = sum(math.prod(dims) for dims, _ in read_header(gguf_path).tensors.values())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    declared = sum(t.numel() for t in (*model.parameters(), *model.buffers()))
    if declared > DECLARED_SLACK * held + (1 << 20):
        raise ExportError(f"{gguf_path} is not a usable GGUF file: its metadata makes a {config.model_type} model of {declared:,} parameters "
                          f"and buffers, and its tensors hold {held:,}; the file is damaged or not a model: download or convert the GGUF again")


def run_optimum(model_dir: Path, out_dir: Path, *, with_past: bool, kind: str, family: str, model=None) -> Path:
    """export_hf_folder with Optimum's failures turned into one-line ExportErrors."""
    try:
        return export_hf_folder(model_dir, out_dir, with_past=with_past, kind=kind, model=model)
    except ExportError:
        raise
    except Exception as err:  # Optimum and torch.onnx raise many kinds; the cause stays chained for debugging
        raise ExportError(f"Optimum failed to export this {family} model ({type(err).__name__}: {first_line(err)}); "
                          "report it with the model") from err
