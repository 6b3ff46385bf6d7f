"""Builds an offline stand-in for the Hub repos TRL's tests load, under HUB/trl-internal-testing/...

Runs TRL's own generation scripts (scripts/generate_*_dataset.py, scripts/generate_tiny_models/**) from an
extracted TRL checkout, with the Hub calls replaced: tokenizers come from one byte-level BPE trained here on the
datasets' text (with the special tokens of every chat template and the real chat template of each family, read
from trl/chat_templates), push_to_hub saves to disk, the reference-config checks are skipped. Nothing of TRL
is committed to fastalign: the scripts run from the extracted checkout.

usage: python build_hub.py TRL_CHECKOUT HUB_DIR [script module ...]
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import sys
from pathlib import Path

import transformers
import trl
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TRL_ROOT, HUB = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
ORG = HUB / "trl-internal-testing"
TEMPLATES = Path(trl.__file__).parent / "chat_templates"

SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<think>", "</think>",
    "<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>", "<|call|>", "<|constrain|>",
    "<|startoftext|>", "<|im_sep|>", "<BOS_TOKEN>", "<EOS_TOKEN>", "<PAD>", "<|START_OF_TURN_TOKEN|>",
    "<|END_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>", "<|START_RESPONSE|>",
    "<|END_RESPONSE|>", "<|START_THINKING|>", "<|END_THINKING|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>",
    "<|assistant|>", "<|observation|>", "<tool_response>", "</tool_response>", "<|begin_of_text|>",
    "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|python_tag|>", "<|pad|>",
    "<|tool_call_start|>", "<|tool_call_end|>", "<|tool_list_start|>", "<|tool_list_end|>",
    "<|tool_response_start|>", "<|tool_response_end|>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>",
]  # fmt: skip

# (MODEL_ID substring, chat template file, eos, pad, bos) for each family the scripts load a tokenizer for.
FAMILIES = [
    ("Qwen2.5", "qwen2_5.jinja", "<|im_end|>", "<|endoftext|>", None),
    ("Qwen3", "qwen3.jinja", "<|im_end|>", "<|endoftext|>", None),
    ("tiny-aya", "cohere2.jinja", "<|END_OF_TURN_TOKEN|>", "<PAD>", "<BOS_TOKEN>"),
    ("GLM-4.5", "glm4moe.jinja", "<|user|>", "<|endoftext|>", None),
    ("gpt-oss", "gptoss.jinja", "<|return|>", "<|endoftext|>", "<|startoftext|>"),
    ("Nemotron-3-Nano", "nemotron_3_nano.jinja", "<|im_end|>", "<|endoftext|>", None),
    ("Olmo-3", "qwen3.jinja", "<|im_end|>", "<|pad|>", None),
    ("LFM2.5", "lfm2_2_5.jinja", "<|im_end|>", "<|pad|>", "<|startoftext|>"),
    ("LFM2", "lfm2.jinja", "<|im_end|>", "<|pad|>", "<|startoftext|>"),
    ("Llama-3.2", "llama3_2.jinja", "<|eot_id|>", "<|pad|>", "<|begin_of_text|>"),
]


def _texts() -> list[str]:
    """Every string in the datasets under ORG, for the BPE's merges."""
    import pyarrow.parquet as pq

    out = []
    for path in ORG.glob("*/*/*.parquet"):
        for column in pq.read_table(path).to_pylist():
            out.append(json.dumps(column, ensure_ascii=False))
    return out


_BACKEND = None


def _backend() -> Tokenizer:
    global _BACKEND
    if _BACKEND is None:
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=2000, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        tok.train_from_iterator(_texts() or ["hello world"], trainer)
        _BACKEND = tok
    return _BACKEND


def tokenizer_for(model_id: str, *args, **kwargs) -> transformers.PreTrainedTokenizerFast:
    family = next((f for f in FAMILIES if f[0] in model_id), None)
    if family is None:
        raise KeyError(f"no tokenizer family for {model_id}")
    _, template, eos, pad, bos = family
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=_backend(), eos_token=eos, pad_token=pad, bos_token=bos, unk_token=None
    )
    tok.chat_template = (TEMPLATES / template).read_text()
    return tok


def save_model(model, tokenizer, generation_config, prefix=None, suffix=None, create_pr=None):
    name = model.__class__.__name__
    if prefix is not None:
        name = f"{prefix}-{name}"
    if suffix is not None:
        name += f"-{suffix}"
    out = ORG / name
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if generation_config is not None:
        generation_config.save_pretrained(out)
    print("saved", out)


def dataset_saver(repo_id, config_name):
    def push(self, *_, **__):
        splits = self if isinstance(self, dict) else {"train": self}
        root = ORG / repo_id.split("/")[-1]
        for split, ds in splits.items():
            (root / config_name).mkdir(parents=True, exist_ok=True)
            ds.to_parquet(root / config_name / f"{split}-00000-of-00001.parquet")
        configs = {}
        card = root / "configs.json"
        if card.exists():
            configs = json.loads(card.read_text())
        configs[config_name] = sorted(splits)
        card.write_text(json.dumps(configs))
        lines = ["---", "configs:"]
        for name, names in sorted(configs.items()):
            lines += [f"- config_name: {name}", "  data_files:"]
            lines += [f"  - split: {s}\n    path: {name}/{s}-*" for s in names]
        (root / "README.md").write_text("\n".join(lines + ["---", ""]))

    return push


def build_datasets():
    import datasets

    for script in ("generate_zen_dataset", "generate_toolcall_dataset", "generate_harmony_dataset"):
        module = runpy.run_path(str(TRL_ROOT / "scripts" / f"{script}.py"), run_name="not_main")
        repo = {"generate_zen_dataset": "zen", "generate_toolcall_dataset": "toolcall"}.get(script, "harmony")

        def patched(self, repo_id, config_name="default", **kw):
            return dataset_saver(repo_id, config_name)(self)

        datasets.Dataset.push_to_hub = patched
        datasets.DatasetDict.push_to_hub = patched
        module["main"](0.1, True, f"trl-internal-testing/{repo}")


def build_models(modules):
    sys.path.insert(0, str(TRL_ROOT))
    transformers.AutoTokenizer.from_pretrained = staticmethod(tokenizer_for)
    transformers.GenerationConfig.from_pretrained = staticmethod(lambda *a, **k: transformers.GenerationConfig())
    common = importlib.import_module("scripts.generate_tiny_models._common")
    common.check_transformers_version = lambda *a, **k: None
    common.check_dtype_pattern = lambda *a, **k: None
    common.print_config_diff = lambda *a, **k: None
    common.push_to_hub = save_model
    for module in modules:
        try:
            if module in ID_FIXES:  # scripts that hard-code the real tokenizer's special-token ids
                run_with_ids(module, ID_FIXES[module])
            else:
                importlib.import_module(f"scripts.generate_tiny_models.{module}")
        except Exception as exc:  # report and go on: a test that needs it fails at load
            print(f"FAILED {module}: {exc!r}")


ID_FIXES = {"for_causal_lm.olmo3_for_causal_lm": {"eos_token_id=100257": "eos", "pad_token_id=100277": "pad"}}


def run_with_ids(module, fixes):
    """Runs a generation script with its hard-coded token ids replaced by this tokenizer's."""
    name = f"scripts.generate_tiny_models.{module}"
    path = TRL_ROOT / (name.replace(".", "/") + ".py")
    source = path.read_text()
    tok = tokenizer_for({"olmo3": "Olmo-3"}[module.split(".")[-1].split("_")[0]])
    for text, which in fixes.items():
        key = text.split("=")[0]
        source = source.replace(text, f"{key}={getattr(tok, which + '_token_id')}")
    namespace = {"__name__": name, "__package__": name.rsplit(".", 1)[0], "__file__": str(path)}
    exec(compile(source, str(path), "exec"), namespace)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not (ORG / "zen").exists():
        build_datasets()
    build_models(sys.argv[3:])
