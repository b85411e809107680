"""FastTokenizer (tokenizers + Jinja) against transformers' AutoTokenizer on the same files:
the same ids, text, tokens and rendered chat, for the bundled tokenizer and variants of its
tokenizer_config.json."""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tpserve.bundled import DEFAULT_MODEL_DIR
from tpserve.tokenizer import FastTokenizer, load_tokenizer

FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
CHAT = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}[S]{{ m['content'] | trim }}"
        "{% else %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
VARIANTS = {
    "bundled": {},
    "eos_too": {"add_eos_token": True},
    "no_bos": {"add_bos_token": False},
    "cleanup": {"clean_up_tokenization_spaces": True, "chat_template": CHAT},
    "forced_cleanup": {"clean_up_tokenization_spaces": True,
                       "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output": True},
    # transformers would rebuild this Llama tokenizer's pre-tokenizer (prepend "first", not the
    # file's "never"): load_tokenizer must hand it to transformers
    "prefix_space": {"add_prefix_space": True},
    "named_templates": {"chat_template": [{"name": "default", "template": CHAT},
                                          {"name": "tool_use", "template": "{{ tools | length }}" + CHAT}]},
}
RUNS_AS_WRITTEN = {"bundled", "eos_too", "no_bos", "cleanup", "forced_cleanup", "named_templates"}
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=80) | st.sampled_from(
    ["def add(a, b):\n    return a + b", "  leading spaces", "<s> in text </s>", "tabs\tand\nnewlines\r\n",
     "héllo wörld ☃ 日本", "", " ", "don't stop , ok ."])
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    if not (DEFAULT_MODEL_DIR / "tokenizer.json").is_file():
        pytest.skip("bundled tokenizer not built")
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp(request.param)
    for name in FILES:
        if (DEFAULT_MODEL_DIR / name).is_file():
            shutil.copy(DEFAULT_MODEL_DIR / name, out / name)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.update(VARIANTS[request.param])
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    mine = load_tokenizer(out)
    assert isinstance(mine, FastTokenizer) == (request.param in RUNS_AS_WRITTEN), request.param
    return mine, AutoTokenizer.from_pretrained(str(out))


def test_load_tokenizer_picks_the_fast_one_and_hf_on_request(monkeypatch):
    assert isinstance(load_tokenizer(DEFAULT_MODEL_DIR), FastTokenizer)
    monkeypatch.setenv("TPSERVE_TOKENIZER", "hf")
    assert not isinstance(load_tokenizer(DEFAULT_MODEL_DIR), FastTokenizer)


@SETTINGS
@given(text=TEXT, special=st.booleans())
@example(text="<s> in text </s>", special=True)
def test_encode_matches(pair, text, special):
    fast, hf = pair
    assert fast.encode(text, add_special_tokens=special) == hf.encode(text, add_special_tokens=special)


@SETTINGS
@given(ids=st.lists(st.integers(0, 4095), max_size=40), skip=st.booleans())
@example(ids=[1, 450, 2, 0, 3], skip=True)
@example(ids=[4003, 1640, 308, 3999, 4020, 289], skip=False)
def test_decode_and_tokens_match(pair, ids, skip):
    fast, hf = pair
    assert fast.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert fast.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False) == \
        hf.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
    assert fast.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)


@SETTINGS
@given(contents=st.lists(TEXT, min_size=1, max_size=4), generation=st.booleans())
def test_chat_template_matches(pair, contents, generation):
    fast, hf = pair
    messages = [{"role": ["system", "user", "assistant"][i % 3], "content": c} for i, c in enumerate(contents)]
    for template in (CHAT, None) if getattr(fast, "chat_template", None) else (CHAT,):
        got = fast.apply_chat_template(messages, chat_template=template, tokenize=True,
                                       add_generation_prompt=generation, return_dict=False)
        want = hf.apply_chat_template(messages, chat_template=template, tokenize=True,
                                      add_generation_prompt=generation, return_dict=False)
        assert got == list(want)
        if template is None and isinstance(fast.chat_template, dict):  # the tool_use one, with tools
            tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
            assert fast.apply_chat_template(messages, tools=tools, tokenize=False) == \
                hf.apply_chat_template(messages, tools=tools, tokenize=False)
        assert fast.apply_chat_template(messages, chat_template=template, tokenize=False,
                                        add_generation_prompt=generation) == \
            hf.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=generation)


def test_an_unset_special_token_is_undefined_in_templates():
    fast = FastTokenizer(DEFAULT_MODEL_DIR)
    assert fast.pad_token is None
    template = "{{ pad_token is defined }}|{{ bos_token }}"
    assert fast.apply_chat_template([], chat_template=template, tokenize=False) == "False|<s>"


def test_a_template_error_is_raised_as_hf_does():
    fast = FastTokenizer(DEFAULT_MODEL_DIR)
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match="no tools"):
        fast.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{{ raise_exception('no tools') }}")
