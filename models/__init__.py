"""ONNX graph work: checking, storing by hash, splitting into fragments, text encoding,
training packages and importing language models. ``export_training``, ``export_digits``
and ``import_llm`` import torch (and transformers, onnxruntime-genai) when called (the
``export`` extra); nothing else here needs them.

Splitting and analysing graphs (``analyze``, ``split_graph``, ``split_stored``) need the
onnx package (the ``onnx`` extra); storing, checking and hosting models do not, so a node
runs on onnxruntime alone. ``analyze`` and ``split_graph`` are loaded on first use, and
without onnx raise :class:`OnnxMissingError` saying what to install."""

import typing

from ._builtin import DEFAULT_LLM as DEFAULT_LLM
from ._builtin import DEFAULT_MODEL as DEFAULT_MODEL
from ._builtin import builtin_models as builtin_models
from ._builtin import smollm2_gguf as smollm2_gguf
from ._chat import ChatTemplateError as ChatTemplateError
from ._chat import check_messages as check_messages
from ._chat import render_chat as render_chat
from ._cuts import Cut as Cut
from ._cuts import CutAnalysis as CutAnalysis
from ._detokenize import TextStream as TextStream
from ._digits import Dataset as Dataset
from ._digits import batch_indices as batch_indices
from ._digits import digits_mlp as digits_mlp
from ._digits import export_digits as export_digits
from ._digits import load_digits as load_digits
from ._errors import InvalidModelError as InvalidModelError
from ._errors import LlmImportError as LlmImportError
from ._errors import ModelError as ModelError
from ._errors import OnnxMissingError as OnnxMissingError
from ._errors import PathEscapeError as PathEscapeError
from ._errors import SplitError as SplitError
from ._errors import StoreFullError as StoreFullError
from ._errors import UnknownModelError as UnknownModelError
from ._export_training import export_training as export_training
from ._fragments import Fragment as Fragment
from ._fragments import SplitPlan as SplitPlan
from ._fragments import analyze_stored as analyze_stored
from ._fragments import held_fragments as held_fragments
from ._fragments import split_stored as split_stored
from ._fragments import split_stored_at as split_stored_at
from ._llm_card import LlmCard as LlmCard
from ._llm_card import llm_card as llm_card
from ._llm_import import QUANTIZE as QUANTIZE
from ._llm_import import build_llm as build_llm
from ._llm_import import import_llm as import_llm
from ._paths import inside as inside
from ._quota import GB as GB
from ._quota import default_quota as default_quota
from ._quota import plan_eviction as plan_eviction
from ._store import MODEL_FILE as MODEL_FILE
from ._store import ModelStore as ModelStore
from ._store import StoredModel as StoredModel
from ._store import check_name as check_name
from ._store import digest_order as digest_order
from ._text import TokenizerMissingError as TokenizerMissingError
from ._text import encode_texts as encode_texts
from ._text import sentence_embeddings as sentence_embeddings
from ._training import TrainingFragment as TrainingFragment
from ._training import TrainingPackage as TrainingPackage
from ._training import compose_inference as compose_inference
from ._training import load_package as load_package

if typing.TYPE_CHECKING:
    from ._split import analyze as analyze
    from ._split import split_graph as split_graph

_NEED_ONNX = {"analyze", "split_graph"}  # loaded on first use: they import onnx


def __getattr__(name: str) -> typing.Any:
    if name not in _NEED_ONNX:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from ._onnx import require_onnx

    require_onnx(f"{name}()")
    from . import _split

    return getattr(_split, name)
