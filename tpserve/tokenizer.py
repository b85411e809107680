"""Tokenizer loading on rank 0. A model directory without tokenizer files is valid: it then
serves token-id prompts only.

A directory with a tokenizer.json is served by `FastTokenizer`, which runs that file with the
`tokenizers` library (what transformers' fast tokenizers wrap) and reads tokenizer_config.json for
the special tokens and the chat template, which it renders with Jinja the way
transformers does. It starts in about 0.1 s where importing transformers and building its
tokenizer takes 1.5-2.5 s (a large share of a short offline job's run time), and it gives the same
ids and text (tests/unit/test_tokenizer.py checks both against transformers). Other directories
(a sentencepiece tokenizer.model only), or TPSERVE_TOKENIZER=hf, use transformers' AutoTokenizer.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
# transformers' clean_up_tokenization (used when tokenizer_config.json asks for it)
CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def has_tokenizer(model_dir: str | Path) -> bool:
    return any((Path(model_dir) / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(model_dir: str | Path):
    """The tokenizer of `model_dir`, or None when the directory has none: FastTokenizer when
    transformers would run its tokenizer.json as written (runs_as_written), else transformers'
    AutoTokenizer."""
    if not has_tokenizer(model_dir):
        return None
    if os.environ.get("TPSERVE_TOKENIZER", "fast") != "hf" and runs_as_written(model_dir):
        return FastTokenizer(model_dir)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


# Classes transformers 5 builds from tokenizer.json unchanged.
GENERIC_CLASSES = (None, "PreTrainedTokenizerFast", "TokenizersBackend")


def runs_as_written(model_dir: str | Path) -> bool:
    """Whether transformers 5 would tokenize with `model_dir`'s tokenizer.json unchanged. Generic
    classes do. A Llama tokenizer keeps the file's vocabulary, merges and post-processor but builds
    its own normalizer (none), Metaspace pre-tokenizer and decoder from add_prefix_space and
    legacy: the file runs as written only when it already holds exactly those. Other model-specific
    classes are not assumed to."""
    model_dir = Path(model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        return False
    config_file = model_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    cls = config.get("tokenizer_class")
    if cls in GENERIC_CLASSES:
        return True
    if cls not in ("LlamaTokenizer", "LlamaTokenizerFast"):
        return False
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    prefix_space = config.get("add_prefix_space")
    prefix_space = True if prefix_space is None else prefix_space
    scheme = ("first" if not config.get("legacy", False) else "always") if prefix_space else "never"
    decoders = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}]
    if prefix_space:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return (spec.get("normalizer") is None
            and spec.get("pre_tokenizer") == {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": scheme,
                                              "split": False}
            and spec.get("decoder") == {"type": "Sequence", "decoders": decoders})


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json gives it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class FastTokenizer:
    """encode / decode / convert_ids_to_tokens / apply_chat_template with transformers' meanings,
    on the `tokenizers` library."""

    def __init__(self, model_dir: str | Path) -> None:
        from tokenizers import Tokenizer

        model_dir = Path(model_dir)
        self._tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self._tok.no_truncation()
        self._tok.no_padding()
        config_file = model_dir / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        special_map_file = model_dir / "special_tokens_map.json"
        special_map = json.loads(special_map_file.read_text()) if special_map_file.is_file() else {}
        self.special_tokens = {name: _token_text(config.get(name, special_map.get(name)))
                               for name in SPECIAL_TOKEN_NAMES}
        for name, text in self.special_tokens.items():
            setattr(self, name, text)
        # transformers 5 ignores clean_up_tokenization_spaces for BPE models (it would strip spaces
        # before punctuation) unless told to force it
        bpe = json.loads(self._tok.to_str()).get("model", {}).get("type") == "BPE"
        force = bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"))
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False)) and (
            not bpe or force)
        template_file = model_dir / "chat_template.jinja"
        template = template_file.read_text() if template_file.is_file() else config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            template = {t["name"]: t["template"] for t in template}
        self.chat_template = template
        # BOS/EOS come from tokenizer.json's post-processor, as in transformers 5 (which no longer
        # rebuilds it from tokenizer_config.json's add_bos_token / add_eos_token)
        self.all_special_ids = sorted({i for i in (self._tok.token_to_id(t) for t in self.special_tokens.values() if t)
                                       if i is not None})
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None) -> str:
        if isinstance(ids, int):
            ids = [ids]
        text = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        clean = clean_up_tokenization_spaces
        if clean is None:
            clean = self.clean_up_tokenization_spaces
        if clean:
            for before, after in CLEAN_UP:
                text = text.replace(before, after)
        return text

    def convert_ids_to_tokens(self, ids) -> list[str] | str:
        if isinstance(ids, int):
            return self._tok.id_to_token(ids)
        return [self._tok.id_to_token(i) for i in ids]

    def apply_chat_template(self, messages: list[dict], chat_template: str | None = None, tokenize: bool = True,
                            add_generation_prompt: bool = False, return_dict: bool = False, tools=None,
                            documents=None, **kwargs):
        """Render `messages` with the template (a Jinja sandbox with transformers' settings and
        helpers) and, with tokenize, encode the text without adding special tokens."""
        template = chat_template or self.chat_template
        if isinstance(template, dict):  # named templates, chosen as transformers does
            template = template.get("tool_use") if tools and "tool_use" in template else template.get("default")
        if template is None:
            raise ValueError("this tokenizer has no chat template and none was given")
        special = {name: text for name, text in self.special_tokens.items() if text is not None}
        text = _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                         documents=documents, **{**special, **kwargs})
        if not tokenize:
            return text
        ids = self.encode(text, add_special_tokens=False)
        return {"input_ids": ids} if return_dict else ids


_TEMPLATES: dict[str, object] = {}


def _compile(template: str):
    """A compiled chat template: Jinja's immutable sandbox, trim_blocks and lstrip_blocks, the
    loop-controls extension, and the raise_exception / strftime_now helpers and tojson filter that
    chat templates written for transformers use."""
    if template not in _TEMPLATES:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _TEMPLATES[template] = env.from_string(template)
    return _TEMPLATES[template]
