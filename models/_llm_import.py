"""Importing a language model: GGUF or Hugging Face folder in, one stored causal LM out.

The graph is written by onnxruntime-genai's model builder, not by torch's exporter.
Measured here on SmolLM2-135M: the builder writes the fp32 decoder with past key/values
in 13 s (torch's dynamo exporter: 3-4 minutes), its greedy text equals torch's, and it
quantizes to int4 or int8 (MatMulNBits, weight-only, block 32) in the same pass. Its
graph uses onnxruntime's fused contrib ops (GroupQueryAttention with the rotary
embedding inside, SkipSimplifiedLayerNormalization, MatMulNBits), which the splitter
handles explicitly (see ``_contrib``).

The builder's decoder takes ``input_ids``, ``attention_mask`` and
``past_key_values.{i}.key/value``; it has no ``position_ids`` input: GroupQueryAttention
derives each token's position from the mask (sum - 1), so prompts must be right-padded
or unpadded. Outputs are ``logits`` and ``present.{i}.key/value``.

A GGUF file is first turned into a Hugging Face folder: transformers reads it (with
the ``gguf`` package) and de-quantizes it to float32; the GGUF quantization config is
dropped so that ``save_pretrained`` writes plain safetensors. torch, transformers,
gguf, accelerate and onnxruntime-genai are imported only here, inside the functions
(the ``export`` extra); nodes run the result with onnxruntime, numpy and tokenizers.
"""

import contextlib
import importlib.util
import io
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._errors import LlmImportError
from ._llm_card import CARD_FILE, TOKENIZER_FILE, LlmCard
from ._onnx import require_onnx
from ._store import MODEL_FILE, ModelStore, StoredModel, check_name

if TYPE_CHECKING:
    import onnx

QUANTIZE = ("none", "int8", "int4")
_PRECISION = {"none": "fp32", "int8": "int8", "int4": "int4"}
# MatMulNBits options for int8/int4: block 32, and accuracy level 4 (activations are
# quantized to int8 inside the MatMul), the builder's CPU default and its fastest path.
_NBITS_OPTIONS = ["block_size=32", "accuracy_level=4"]
_EXPORT_PACKAGES = ("torch", "transformers", "gguf", "accelerate", "onnxruntime_genai", "onnx")
_GGUF_MAGIC = b"GGUF"
# transformers' GenerationConfig defaults, for models whose config names none.
_DEFAULT_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": 50}

Progress = Callable[[str], None]  # told the step that starts now


def _require_export_extra() -> None:
    missing = [name for name in _EXPORT_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise LlmImportError(
            f"importing a language model needs {', '.join(missing)}: pip install 'salala[export]'"
        )


def source_kind(source: Path) -> str:
    """``"gguf"`` or ``"hf"``; LlmImportError for anything else."""
    if source.is_file():
        with source.open("rb") as stream:
            if stream.read(4) == _GGUF_MAGIC:
                return "gguf"
        raise LlmImportError(f"{source} is not a GGUF file (it does not start with 'GGUF')")
    if source.is_dir():
        has_weights = any(source.glob("*.safetensors")) or any(source.glob("*.bin"))
        if (source / "config.json").is_file() and has_weights:
            return "hf"
        raise LlmImportError(
            f"{source} is not a Hugging Face model folder (it needs config.json and "
            "safetensors weights)"
        )
    raise LlmImportError(f"{source} does not exist")


def gguf_to_hf(gguf: Path, folder: Path) -> None:
    """Write a GGUF model as a float32 Hugging Face folder (weights and tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the caller shows its own progress
    try:
        # The GGUF reader draws its own tqdm bar on stderr, beyond transformers' switch;
        # failures still arrive as exceptions.
        with contextlib.redirect_stderr(io.StringIO()):
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise LlmImportError(f"transformers cannot load {gguf}: {exc}") from exc
    # The weights are de-quantized already; without this save_pretrained refuses them.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _build(hf: Path, out: Path, quantize: str, scratch: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(hf),
        "-o",
        str(out),
        "-p",
        _PRECISION[quantize],
        "-e",
        "cpu",
        "-c",
        str(scratch),
    ]
    if quantize != "none":
        command += ["--extra_options", *_NBITS_OPTIONS]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not (out / MODEL_FILE).is_file():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise LlmImportError(f"onnxruntime-genai's model builder failed:\n{tail}")


def _json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise LlmImportError(f"cannot read {file}: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _ids(value: object) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _token_id(tokenizer: Any, token: object) -> int | None:
    if isinstance(token, dict):
        token = token.get("content")
    return tokenizer.token_to_id(token) if isinstance(token, str) else None


def _kv_info(model: "onnx.ModelProto") -> tuple[str, bool]:
    """The past tensors' dtype, and whether the graph takes position_ids."""
    inputs = {i.name: i for i in model.graph.input}
    past = inputs.get("past_key_values.0.key")
    if past is None or "input_ids" not in inputs or "attention_mask" not in inputs:
        raise LlmImportError(
            "the built graph lacks input_ids, attention_mask or past_key_values.0.key"
        )
    from onnx import helper

    dtype = helper.tensor_dtype_to_np_dtype(past.type.tensor_type.elem_type).name
    return dtype, "position_ids" in inputs


def make_card(hf: Path, built: Path) -> LlmCard:
    """The card of the model the builder wrote to ``built`` from the folder ``hf``."""
    from tokenizers import Tokenizer

    genai = _json(built / "genai_config.json")
    model = genai.get("model", {})
    decoder = model.get("decoder", {})
    search = genai.get("search", {})
    generation = _json(hf / "generation_config.json")
    tokenizer_config = _json(hf / "tokenizer_config.json")
    tokenizer = Tokenizer.from_file(str(built / TOKENIZER_FILE))

    eos: list[int] = []
    for candidate in [
        *_ids(generation.get("eos_token_id")),
        *_ids(model.get("eos_token_id")),
        *_ids(_token_id(tokenizer, tokenizer_config.get("eos_token"))),
    ]:
        if candidate not in eos:
            eos.append(candidate)
    bos = model.get("bos_token_id", generation.get("bos_token_id"))
    if bos is None:
        bos = _token_id(tokenizer, tokenizer_config.get("bos_token"))
    # The loop prepends BOS only if the model wants it and tokenizer.json does not add it.
    wants_bos = bool(tokenizer_config.get("add_bos_token", False)) and bos is not None
    adds_bos = bool(tokenizer.encode("a").ids[:1] == [bos])
    template_file = hf / "chat_template.jinja"
    template = (
        template_file.read_text(encoding="utf-8")
        if template_file.is_file()
        else tokenizer_config.get("chat_template")
    )
    onnx = require_onnx("importing a language model")
    graph = onnx.load(str(built / MODEL_FILE), load_external_data=False)
    kv_dtype, position_ids = _kv_info(graph)
    sampling = {
        key: generation.get(key, search.get(key, default))
        for key, default in _DEFAULT_SAMPLING.items()
    }
    heads = int(decoder["num_attention_heads"])
    return LlmCard(
        context_length=int(model["context_length"]),
        eos_token_ids=tuple(eos),
        bos_token_id=bos,
        add_bos_token=wants_bos and not adds_bos,
        chat_template=template if isinstance(template, str) else None,
        temperature=float(sampling["temperature"]),
        top_p=float(sampling["top_p"]),
        top_k=int(sampling["top_k"]),
        num_layers=int(decoder["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(decoder["num_key_value_heads"]),
        head_dim=int(decoder["head_size"]),
        hidden_size=int(decoder["hidden_size"]),
        vocab_size=int(model["vocab_size"]),
        kv_dtype=kv_dtype,
        position_ids=position_ids,
    )


def build_llm(source: Path, quantize: str, folder: Path, progress: Progress | None = None) -> Path:
    """Write the decoder, tokenizer and card of ``source`` into ``folder`` (scratch work
    goes there too); returns the ``model.onnx`` path, ready for ``ModelStore.add``."""
    if quantize not in QUANTIZE:
        raise LlmImportError(f"--quantize must be one of {', '.join(QUANTIZE)}, not {quantize!r}")
    source = Path(source)
    kind = source_kind(source)
    _require_export_extra()
    say = progress or (lambda step: None)
    hf = source
    if kind == "gguf":
        say(f"reading {source.name}")
        hf = folder / "hf"
        gguf_to_hf(source, hf)
    say(f"building the ONNX decoder ({_PRECISION[quantize]})")
    built = folder / "onnx"
    _build(hf, built, quantize, folder / "cache")
    if not (built / TOKENIZER_FILE).is_file():
        raise LlmImportError(f"{source} has no tokenizer the builder could save")
    say("writing the card")
    card = make_card(hf, built)
    (built / CARD_FILE).write_text(json.dumps(card.to_dict(), indent=1))
    return built / MODEL_FILE


def import_llm(
    source: Path,
    name: str,
    quantize: str,
    store: ModelStore,
    progress: Progress | None = None,
) -> StoredModel:
    """Import a GGUF file or Hugging Face folder as the causal LM ``name`` in ``store``.

    The stored object holds ``model.onnx`` with its external data, ``tokenizer.json``
    and ``llm.json`` (see ``LlmCard``). LlmImportError says why an import cannot run.
    """
    check_name(name)
    with tempfile.TemporaryDirectory(prefix=".import-llm-", dir=store.root) as tmp:
        model = build_llm(source, quantize, Path(tmp), progress)
        if progress is not None:
            progress("storing")
        return store.add(model, name)
