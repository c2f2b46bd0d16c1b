"""Importing SmolLM2 as a causal LM, its card, and cutting it between layers."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from llm_helpers import (
    card_of,
    empty_past,
    greedy_tokens,
    imported_smollm2,
    next_feeds,
    smollm2_gguf,
)
from salala.models import (
    MODEL_FILE,
    InvalidModelError,
    LlmCard,
    LlmImportError,
    ModelStore,
    import_llm,
    llm_card,
    split_stored,
)
from salala.runtime import ModelSession

PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def fp32() -> Path:
    return imported_smollm2("none")


@pytest.fixture(scope="module")
def int4() -> Path:
    return imported_smollm2("int4")


def prompt_ids(folder: Path, text: str = PROMPT) -> list[int]:
    from tokenizers import Tokenizer

    return list(Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids)


@pytest.mark.slow
def test_greedy_tokens_equal_transformers(fp32: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    card = card_of(fp32)
    prompt = prompt_ids(fp32)
    session = ModelSession(fp32 / MODEL_FILE)

    ours = greedy_tokens(session.run, card, prompt, 24)

    gguf = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with torch.no_grad():
        generated = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=list(card.eos_token_ids),
            pad_token_id=card.eos_token_ids[0],
        )
    theirs = generated[0, len(prompt) :].tolist()
    assert len(ours) >= 8  # a real answer, not an immediate stop
    assert ours == theirs


@pytest.mark.slow
def test_the_card_holds_the_chat_template_and_special_tokens(fp32: Path) -> None:
    from tokenizers import Tokenizer

    card = card_of(fp32)
    tokenizer = Tokenizer.from_file(str(fp32 / "tokenizer.json"))
    assert card.chat_template is not None and "<|im_start|>" in card.chat_template
    assert tokenizer.token_to_id("<|im_end|>") in card.eos_token_ids
    assert card.bos_token_id == tokenizer.token_to_id("<|im_start|>")
    assert card.add_bos_token is False  # SmolLM2's tokenizer adds none and wants none
    assert (card.num_layers, card.num_heads, card.num_kv_heads) == (30, 9, 3)
    assert (card.head_dim, card.hidden_size, card.vocab_size) == (64, 576, 49152)
    assert card.kv_dtype == "float32" and card.position_ids is False
    assert card.context_length == 8192
    assert LlmCard.from_dict(json.loads(json.dumps(card.to_dict()))) == card


@pytest.mark.slow
def test_the_store_hash_covers_the_card_and_tokenizer(fp32: Path, tmp_path: Path) -> None:
    folder = tmp_path / "copy"
    folder.mkdir()
    for file in fp32.iterdir():
        shutil.copyfile(file, folder / file.name)
    store = ModelStore(tmp_path / "store")
    original = store.add(folder / MODEL_FILE, "smol")
    assert original.sha256 == fp32.name  # the same files hash the same anywhere
    assert sorted(p.name for p in original.path.parent.iterdir()) == sorted(
        p.name for p in fp32.iterdir()
    )

    card = json.loads((fp32 / "llm.json").read_text())
    (folder / "llm.json").unlink()
    (folder / "llm.json").write_text(json.dumps({**card, "temperature": 0.5}))
    changed = store.add(folder / MODEL_FILE, "smol-cooler")
    assert changed.sha256 != original.sha256
    assert llm_card(changed) == LlmCard.from_dict({**card, "temperature": 0.5})

    (folder / "llm.json").write_text(json.dumps({**card, "top_p": 2.0}))
    with pytest.raises(InvalidModelError, match="top_p"):
        store.add(folder / MODEL_FILE, "smol-broken")


def _whole_and_chain(
    whole: ModelSession, stages: list[ModelSession], feeds: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    expected = whole.run(feeds)
    values = dict(feeds)
    for stage in stages:
        values.update(stage.run({spec.name: values[spec.name] for spec in stage.inputs}))
    return expected, values


@pytest.mark.slow
def test_three_stages_reproduce_the_whole_model_exactly(fp32: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    stored = store.add(fp32 / MODEL_FILE, "smol")
    card = card_of(fp32)
    plan = split_stored(store, stored, 3)

    # Each stage holds a contiguous block of layers with its own past and present.
    layers = []
    for fragment in plan.fragments:
        past = [n for n in fragment.inputs if n.startswith("past_")]
        present = [n for n in fragment.outputs if n.startswith("present.")]
        block = sorted({int(n.split(".")[1]) for n in past})
        assert block == list(range(block[0], block[-1] + 1))
        assert sorted(past) == sorted(n for i in block for n in card.past_names(i))
        assert sorted(present) == sorted(n for i in block for n in card.present_names(i))
        layers.append(block)
    assert [layer for block in layers for layer in block] == list(range(card.num_layers))
    assert "input_ids" in plan.fragments[0].inputs
    assert all("input_ids" not in f.inputs for f in plan.fragments[1:])
    assert "logits" in plan.fragments[-1].outputs
    for before, after in zip(plan.fragments, plan.fragments[1:], strict=False):
        crossing = [n for n in before.outputs if not n.startswith("present.")]
        assert len(crossing) == 2  # the residual stream and the MLP's output
        assert [n for n in after.inputs if n in crossing] == crossing

    whole = ModelSession(stored.path)
    stages = [ModelSession(f.path) for f in plan.fragments]
    prompt = prompt_ids(fp32)
    feeds = {
        "input_ids": np.array([prompt], dtype=np.int64),
        "attention_mask": np.ones((1, len(prompt)), dtype=np.int64),
        **empty_past(card),
    }
    for step in range(4):  # the prefill, then three decode steps
        expected, chained = _whole_and_chain(whole, stages, feeds)
        for name, value in expected.items():
            assert np.array_equal(chained[name], value), (step, name)
        token = int(expected["logits"][0, -1].argmax())
        feeds = next_feeds(card, expected, token, feeds["attention_mask"].shape[1] + 1)


@pytest.mark.slow
def test_int4_stages_need_at_least_three_times_less_memory(
    fp32: Path, int4: Path, tmp_path: Path
) -> None:
    store = ModelStore(tmp_path / "store")
    full = split_stored(store, store.add(fp32 / MODEL_FILE, "smol"), 3)
    small = split_stored(store, store.add(int4 / MODEL_FILE, "smol-int4"), 3)
    assert card_of(int4).num_layers == card_of(fp32).num_layers
    assert 3 * max(f.weight_bytes for f in small.fragments) <= min(
        f.weight_bytes for f in full.fragments
    )
    prompt = prompt_ids(int4)
    assert len(greedy_tokens(ModelSession(int4 / MODEL_FILE).run, card_of(int4), prompt, 4)) == 4


def test_importing_what_is_not_a_model_fails_clearly(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    with pytest.raises(LlmImportError, match="not a GGUF file"):
        import_llm(text, "x", "none", store)
    with pytest.raises(LlmImportError, match="not a Hugging Face model folder"):
        import_llm(tmp_path, "x", "none", store)
    with pytest.raises(LlmImportError, match="does not exist"):
        import_llm(tmp_path / "missing.gguf", "x", "none", store)
    with pytest.raises(LlmImportError, match="--quantize must be one of"):
        import_llm(smollm2_gguf(), "x", "int3", store)
    assert store.list() == []


def _card(**changes: object) -> dict[str, object]:
    card: dict[str, object] = {
        "context_length": 2048,
        "eos_token_ids": [2],
        "bos_token_id": 1,
        "add_bos_token": False,
        "chat_template": None,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 40,
        "num_layers": 4,
        "num_heads": 8,
        "num_kv_heads": 2,
        "head_dim": 16,
        "hidden_size": 128,
        "vocab_size": 1000,
        "kv_dtype": "float32",
        "position_ids": False,
    }
    return {**card, **changes}


def test_a_card_round_trips() -> None:
    card = LlmCard.from_dict(_card())
    assert LlmCard.from_dict(card.to_dict()) == card
    assert card.past_names(3) == ("past_key_values.3.key", "past_key_values.3.value")
    assert card.present_names(0) == ("present.0.key", "present.0.value")
    assert card.kv_bytes_per_token() == 2 * 4 * 2 * 16 * 4


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"surprise": 1}, "unknown fields: surprise"),
        ({"num_layers": True}, "num_layers"),
        ({"num_layers": 0}, "num_layers"),
        ({"context_length": 1.5}, "context_length"),
        ({"eos_token_ids": []}, "eos_token_ids"),
        ({"eos_token_ids": [1000]}, "eos_token_ids"),
        ({"eos_token_ids": "2"}, "eos_token_ids"),
        ({"bos_token_id": -1}, "bos_token_id"),
        ({"bos_token_id": None, "add_bos_token": True}, "names none"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": 1001}, "top_k"),
        ({"num_kv_heads": 3}, "multiple"),
        ({"num_kv_heads": 9}, "num_kv_heads"),
        ({"kv_dtype": "int8"}, "kv_dtype"),
        ({"chat_template": 7}, "chat_template"),
        ({"past_key": "past.key"}, "past_key"),
        ({"present_value": "present.{i}.{j}"}, "present_value"),
        ({"kind": "embedding"}, "kind"),
        ({"position_ids": "no"}, "position_ids"),
    ],
)
def test_a_bad_card_is_refused_naming_the_field(changes: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidModelError, match=field):
        LlmCard.from_dict(_card(**changes))


def test_a_card_missing_a_field_is_refused() -> None:
    card = _card()
    del card["vocab_size"]
    with pytest.raises(InvalidModelError, match="lacks fields: vocab_size"):
        LlmCard.from_dict(card)


def test_a_model_without_a_card_is_not_a_language_model(tmp_path: Path) -> None:
    from conftest import minilm_path

    stored = ModelStore(tmp_path).add(minilm_path(), "minilm")
    assert llm_card(stored) is None
    assert llm_card(stored.path.parent) is None
