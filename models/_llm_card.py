"""The card of a language model: what a generation loop must know beside the graph.

An imported causal LM is stored as one object whose folder holds ``model.onnx`` (and
its external data), ``tokenizer.json`` and ``llm.json``, this card. The card says how
to feed the graph (the names of its past and present key/value tensors, whether it
takes ``position_ids``), how big its cache is (layers, KV heads, head size, dtype),
how to talk to it (chat template, BOS and EOS tokens) and how it likes to be sampled
(generation defaults). It travels between nodes later, so ``from_dict`` trusts nothing:
every field is type-checked and bounded, and unknown fields are refused.
"""

import json
import math
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._errors import InvalidModelError

if TYPE_CHECKING:  # the store checks cards, so this module must not import it
    from ._store import StoredModel

CARD_FILE = "llm.json"
TOKENIZER_FILE = "tokenizer.json"
KIND = "causal-lm"
_MAX_TEMPLATE = 1 << 20  # chat templates are a few KB; 1 MB is generous
_MAX_CARD = 2 * _MAX_TEMPLATE
_MAX_NAME = 128
_KV_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class LlmCard:
    """How to run and talk to a stored decoder with past key/values.

    ``past_key``/``past_value``/``present_key``/``present_value`` are name templates
    with one ``{i}`` for the layer index. ``top_k`` 0 means no top-k limit.
    """

    context_length: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    add_bos_token: bool
    chat_template: str | None
    temperature: float
    top_p: float
    top_k: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    kv_dtype: str
    position_ids: bool
    past_key: str = "past_key_values.{i}.key"
    past_value: str = "past_key_values.{i}.value"
    present_key: str = "present.{i}.key"
    present_value: str = "present.{i}.value"
    kind: str = KIND

    def __post_init__(self) -> None:
        _check(self)

    def to_dict(self) -> dict[str, Any]:
        card = asdict(self)
        card["eos_token_ids"] = list(self.eos_token_ids)
        return card

    @classmethod
    def from_dict(cls, data: object) -> "LlmCard":
        """Parse an untrusted card; InvalidModelError names the first bad field."""
        if not isinstance(data, dict):
            raise InvalidModelError("an LLM card must be a map")
        names = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in data if k not in names)
        if unknown:
            raise InvalidModelError(f"LLM card has unknown fields: {', '.join(unknown)}")
        missing = sorted(f.name for f in fields(cls) if f.name not in data and f.default is MISSING)
        if missing:
            raise InvalidModelError(f"LLM card lacks fields: {', '.join(missing)}")
        eos = data["eos_token_ids"]
        if not isinstance(eos, (list, tuple)):
            raise InvalidModelError("LLM card field eos_token_ids must be a list")
        return cls(**{**data, "eos_token_ids": tuple(eos)})

    def past_names(self, layer: int) -> tuple[str, str]:
        return self.past_key.format(i=layer), self.past_value.format(i=layer)

    def present_names(self, layer: int) -> tuple[str, str]:
        return self.present_key.format(i=layer), self.present_value.format(i=layer)

    def kv_bytes_per_token(self) -> int:
        """Cache bytes one token of context costs, over all layers (keys and values)."""
        itemsize = 4 if self.kv_dtype == "float32" else 2
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize


def _integer(card: LlmCard, name: str, low: int, high: int) -> None:
    value = getattr(card, name)
    if type(value) is not int or not low <= value <= high:
        raise InvalidModelError(f"LLM card field {name} must be an integer in [{low}, {high}]")


def _number(card: LlmCard, name: str, low: float, high: float, *, open_low: bool) -> None:
    value = getattr(card, name)
    if type(value) not in (int, float) or not math.isfinite(value):
        raise InvalidModelError(f"LLM card field {name} must be a finite number")
    if value > high or value < low or (open_low and value == low):
        bound = "(" if open_low else "["
        raise InvalidModelError(f"LLM card field {name} must lie in {bound}{low}, {high}]")


def _template(card: LlmCard, name: str) -> None:
    value = getattr(card, name)
    if not isinstance(value, str):
        raise InvalidModelError(f"LLM card field {name} must be a string")
    rest = value.replace("{i}", "", 1)
    if (
        len(value) > _MAX_NAME
        or "{i}" not in value
        or "{" in rest
        or "}" in rest
        or not value.isprintable()
    ):
        raise InvalidModelError(
            f"LLM card field {name} must be a tensor name with one '{{i}}' for the layer"
        )


def _check(card: LlmCard) -> None:
    if card.kind != KIND:
        raise InvalidModelError(f"LLM card kind must be {KIND!r}, not {card.kind!r}")
    _integer(card, "vocab_size", 1, 1 << 22)
    _integer(card, "context_length", 1, 1 << 24)
    _integer(card, "num_layers", 1, 1024)
    _integer(card, "num_heads", 1, 1024)
    _integer(card, "num_kv_heads", 1, card.num_heads)
    _integer(card, "head_dim", 1, 4096)
    _integer(card, "hidden_size", 1, 1 << 17)
    _integer(card, "top_k", 0, card.vocab_size)
    _number(card, "temperature", 0.0, 100.0, open_low=False)
    _number(card, "top_p", 0.0, 1.0, open_low=True)
    if card.num_heads % card.num_kv_heads:
        raise InvalidModelError("LLM card: num_heads must be a multiple of num_kv_heads")
    ids = card.eos_token_ids
    if (
        not isinstance(ids, tuple)
        or not 1 <= len(ids) <= 16
        or any(type(t) is not int or not 0 <= t < card.vocab_size for t in ids)
    ):
        raise InvalidModelError("LLM card field eos_token_ids must be 1-16 token ids")
    bos = card.bos_token_id
    if bos is not None and (type(bos) is not int or not 0 <= bos < card.vocab_size):
        raise InvalidModelError("LLM card field bos_token_id must be a token id or null")
    for flag in ("add_bos_token", "position_ids"):
        if type(getattr(card, flag)) is not bool:
            raise InvalidModelError(f"LLM card field {flag} must be true or false")
    if card.add_bos_token and bos is None:
        raise InvalidModelError("LLM card adds a BOS token but names none")
    template = card.chat_template
    if template is not None and (not isinstance(template, str) or len(template) > _MAX_TEMPLATE):
        raise InvalidModelError("LLM card field chat_template must be a string up to 1 MB")
    if card.kv_dtype not in _KV_DTYPES:
        raise InvalidModelError(f"LLM card field kv_dtype must be one of {_KV_DTYPES}")
    for name in ("past_key", "past_value", "present_key", "present_value"):
        _template(card, name)


def llm_card(model: "Path | str | StoredModel") -> LlmCard | None:
    """The card of a stored language model, None for any other model.

    ``model`` is a StoredModel, its ``model.onnx`` path or its object folder.
    """
    path = Path(model) if isinstance(model, (str, Path)) else model.path
    folder = path if path.is_dir() else path.parent
    if not (folder / CARD_FILE).is_file():
        return None
    return read_card(folder / CARD_FILE)


def read_card(file: Path) -> LlmCard:
    """Parse and check a card file; InvalidModelError if it is not a valid card."""
    try:
        if file.stat().st_size > _MAX_CARD:
            raise InvalidModelError(f"{file} is larger than a card can be")
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidModelError(f"{file} is not a readable JSON card: {exc}") from exc
    return LlmCard.from_dict(data)
