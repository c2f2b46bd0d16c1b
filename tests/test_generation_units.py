"""The pure parts of generation: sampling, the KV cache's budget, text streaming, chat."""

import numpy as np
import pytest
from salala.mesh.inference._kvcache import IDLE_S, TTL_S, CacheFull, CacheMiss, KVCache
from salala.mesh.inference._sampling import Sampling, sample
from salala.models import ChatTemplateError, TextStream, check_messages, render_chat


def test_greedy_takes_the_largest_logit() -> None:
    logits = np.array([0.1, 3.0, 2.9, -1.0])
    assert sample(logits, Sampling(), step=0) == 1


def test_a_seeded_draw_depends_on_seed_and_step_only() -> None:
    logits = np.log(np.full(1000, 1e-3))
    sampling = Sampling(temperature=1.0, seed=7)
    draws = [sample(logits, sampling, step) for step in range(20)]
    assert draws == [sample(logits, sampling, step) for step in range(20)]  # replayable
    assert len(set(draws)) > 10  # and not stuck
    assert draws != [sample(logits, Sampling(temperature=1.0, seed=8), s) for s in range(20)]


def test_top_k_and_top_p_keep_only_the_likeliest_tokens() -> None:
    logits = np.array([5.0, 4.0, 0.0, -1.0, -2.0])
    top2 = {sample(logits, Sampling(1.0, top_k=2, seed=s), 0) for s in range(200)}
    assert top2 == {0, 1}
    # p(0) is about 0.72: a top_p of 0.5 keeps token 0 alone
    assert {sample(logits, Sampling(1.0, top_p=0.5, seed=s), 0) for s in range(50)} == {0}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def kv(length: int) -> dict[str, np.ndarray]:
    return {"past_key_values.0.key": np.zeros((1, 1, length, 256), np.float32)}  # 1 KiB/token


def test_a_step_must_name_the_cached_length() -> None:
    cache = KVCache(1 << 20, Clock())
    step = cache.begin(("d", 0, "a"), 0, 4 << 10)
    assert step.pasts is None
    step.commit(kv(4), 4)
    with pytest.raises(CacheMiss, match="expects 3 cached tokens; here: 4 tokens"):
        cache.begin(("d", 0, "a"), 3, 5 << 10)
    with pytest.raises(CacheMiss, match="here: nothing"):
        cache.begin(("d", 0, "b"), 4, 5 << 10)
    step = cache.begin(("d", 0, "a"), 4, 5 << 10)
    assert step.pasts is not None and step.pasts["past_key_values.0.key"].shape[2] == 4


def test_room_is_made_from_idle_sessions_least_recently_used_first() -> None:
    clock = Clock()
    cache = KVCache(10 << 10, clock)
    for name in "abc":
        cache.begin(("d", 0, name), 0, 3 << 10).commit(kv(3), 3)
        clock.now += 1
    # Every session is still in use: no room for 3 KiB more, and the refusal says why.
    with pytest.raises(CacheFull, match="3 sessions are in use"):
        cache.begin(("d", 0, "x"), 0, 3 << 10)
    clock.now += IDLE_S
    cache.begin(("d", 0, "c"), 3, 4 << 10).commit(kv(4), 4)  # c is used again
    cache.begin(("d", 0, "x"), 0, 3 << 10).commit(kv(3), 3)  # evicts a, the oldest idle
    with pytest.raises(CacheMiss):
        cache.begin(("d", 0, "a"), 3, 4 << 10)
    assert cache.used <= 10 << 10


def test_a_prefill_supersedes_a_step_still_running() -> None:
    cache = KVCache(1 << 20, Clock())
    old = cache.begin(("d", 0, "a"), 0, 2 << 10)
    new = cache.begin(("d", 0, "a"), 0, 2 << 10)
    old.commit(kv(9), 9)  # late: must not overwrite the newer prefill
    new.commit(kv(2), 2)
    assert cache.begin(("d", 0, "a"), 2, 3 << 10).pasts is not None


def test_forgotten_sessions_expire() -> None:
    clock = Clock()
    cache = KVCache(1 << 20, clock)
    cache.begin(("d", 0, "a"), 0, 1 << 10).commit(kv(1), 1)
    clock.now += TTL_S + 1
    cache.begin(("d", 0, "b"), 0, 1 << 10).commit(kv(1), 1)
    assert cache.sessions() == 1


class Letters:
    """A tokenizer whose token i is chr(i), with 0xE9 split over two 'byte' tokens."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        out, i = "", 0
        while i < len(ids):
            if ids[i] == 1000:  # first half of 'é'
                if i + 1 < len(ids) and ids[i + 1] == 1001:
                    out, i = out + "é", i + 2
                    continue
                out, i = out + "\ufffd", i + 1
                continue
            out, i = out + chr(ids[i]), i + 1
        return out


def feed(stream: TextStream, text: str | list[int]) -> list[str]:
    ids = [ord(c) for c in text] if isinstance(text, str) else text
    return [stream.push(i) for i in ids]


def test_pieces_never_split_a_character() -> None:
    stream = TextStream(Letters())
    assert feed(stream, [ord("a"), 1000, 1001, ord("b")]) == ["a", "", "é", "b"]


def test_a_stop_string_is_cut_and_never_shown_in_part() -> None:
    stream = TextStream(Letters(), stop=["END"])
    pieces = feed(stream, "abEN")
    assert "".join(pieces) == "ab" and stream.finish() == "EN"  # held back, then released
    stream = TextStream(Letters(), stop=["END"])
    pieces = feed(stream, "abENDxyz")
    assert "".join(pieces) == "ab" and stream.stopped and stream.finish() == ""


def test_chat_templates_render_in_a_sandbox() -> None:
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    messages = check_messages([{"role": "user", "content": "hi"}])
    assert render_chat(template, messages) == "<user>hi<assistant>"
    hostile = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ChatTemplateError):
        render_chat(hostile, messages)
    with pytest.raises(ChatTemplateError, match=r"messages\[0\].role"):
        check_messages([{"role": "root", "content": "x"}])


@pytest.mark.parametrize(
    "template",
    [
        "{{ 'x' * 10**8 }}",  # a 100 MB string
        "{{ 2 ** 100000 }}",
        "{% for i in range(10**9) %}x{% endfor %}",
        "{% for i in range(100000) %}{% for j in range(100000) %}xx{% endfor %}{% endfor %}",
        "{{ messages.pop() }}",
    ],
)
def test_a_hostile_chat_template_is_refused_quickly(template: str) -> None:
    with pytest.raises(ChatTemplateError):
        render_chat(template, check_messages([{"role": "user", "content": "hi"}]))
