"""Ties read from transformers' source agree with the class built on meta, or stay undecided."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from models import BUILDERS, EXPECTED_TIES, llama_tied

from converter import declared, static_ties
from converter.static_ties import static_ties as read_static


def _config(name: str, folder: Path, **changes: object) -> dict[str, object]:
    model = BUILDERS[name]()
    model.config.architectures = [type(model).__name__]
    for key, value in changes.items():
        setattr(model.config, key, value)
    model.config.save_pretrained(folder)
    return dict(json.loads((folder / "config.json").read_text()))


def _as_sets(groups: list[list[str]]) -> set[frozenset[str]]:
    return {frozenset(g) for g in groups}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_the_source_agrees_with_the_built_class_or_stays_undecided(name: str, tmp_path: Path) -> None:
    config = _config(name, tmp_path)
    architecture = str(config["architectures"][0])  # type: ignore[index]
    answer = read_static(config, architecture)
    built = declared._build_and_read_ties(tmp_path, architecture)
    assert _as_sets(built) == _as_sets(EXPECTED_TIES[name])  # the reference itself is right
    if name in ("gpt2", "llama", "bert"):  # plain `_tied_weights_keys`: the fast path must answer
        assert answer is not None and _as_sets(answer) == _as_sets(built)
    else:  # T5's config class rewrites tie_word_embeddings; BART shares modules by assignment
        assert answer is None


def test_an_untied_config_is_read_as_no_ties(tmp_path: Path) -> None:
    config = _config("llama", tmp_path, tie_word_embeddings=False)
    assert read_static(config, "LlamaForCausalLM") == []
    assert declared._build_and_read_ties(tmp_path, "LlamaForCausalLM") == []


def test_composite_and_unknown_models_stay_undecided() -> None:
    text_config = {"model_type": "llama", "tie_word_embeddings": True}
    assert read_static({"model_type": "llava", "text_config": text_config}, "LlavaForConditionalGeneration") is None
    assert read_static({"model_type": "llama"}, "NoSuchModelForCausalLM") is None
    assert read_static({"model_type": "../../etc"}, "LlamaForCausalLM") is None
    assert read_static({"model_type": "no_such_model_type"}, "LlamaForCausalLM") is None


_PLAIN_MODEL = """
    class ToyPreTrainedModel(PreTrainedModel):
        pass

    class ToyModel(ToyPreTrainedModel):
        def __init__(self, config):
            super().__init__(config)
            self.embed = nn.Embedding(config.vocab_size, 4)
            self.width = self.config.hidden_size

    class ToyForCausalLM(ToyPreTrainedModel, GenerationMixin):
        _tied_weights_keys = {"lm_head.weight": "model.embed.weight"}

        def __init__(self, config):
            super().__init__(config)
            self.model = ToyModel(config)
            self.lm_head = nn.Linear(4, config.vocab_size, bias=False)
            self.post_init()
"""
_PLAIN_CONFIG = """
    class ToyConfig(PreTrainedConfig):
        model_type = "toy"
        tie_word_embeddings: bool = True
"""


@pytest.mark.parametrize(
    ("modeling", "configuration", "decided"),
    [
        (_PLAIN_MODEL, _PLAIN_CONFIG, True),
        # module sharing by assignment
        (_PLAIN_MODEL + "\n    def share(self):\n        self.lm_head = self.model\n", _PLAIN_CONFIG, False),
        (_PLAIN_MODEL.replace("self.width = self.config.hidden_size", "self.head = self.embed"), _PLAIN_CONFIG, False),
        # a module handed to another at construction, which may keep it
        (
            _PLAIN_MODEL.replace("nn.Linear(4, config.vocab_size, bias=False)", "TiedHead(self.model)"),
            _PLAIN_CONFIG,
            False,
        ),
        # a model that ties in its own code, or computes its ties
        (_PLAIN_MODEL + "\n        def tie_weights(self):\n            pass\n", _PLAIN_CONFIG, False),
        (_PLAIN_MODEL.replace("self.post_init()", "self._tied_weights_keys = {}"), _PLAIN_CONFIG, False),
        # regex or module patterns, non-literal mappings
        (_PLAIN_MODEL.replace('"lm_head.weight"', r'r"heads\.\d+\.weight"'), _PLAIN_CONFIG, False),
        (_PLAIN_MODEL.replace('{"lm_head.weight": "model.embed.weight"}', "KEYS"), _PLAIN_CONFIG, False),
        # a sub-model from elsewhere, or one with ties of its own
        (_PLAIN_MODEL.replace("ToyModel(config)", "AutoModel.from_config(config)"), _PLAIN_CONFIG, False),
        (_PLAIN_MODEL.replace("(ToyPreTrainedModel, GenerationMixin)", "(LlamaForCausalLM)"), _PLAIN_CONFIG, False),
        (
            _PLAIN_MODEL.replace("        pass", '        _tied_weights_keys = {"a.weight": "b.weight"}'),
            _PLAIN_CONFIG,
            False,
        ),
        # a config class that rewrites the flag
        (
            _PLAIN_MODEL,
            _PLAIN_CONFIG + "\n        def __post_init__(self):\n            self.tie_word_embeddings = True\n",
            False,
        ),
        (_PLAIN_MODEL, _PLAIN_CONFIG.replace("bool = True", "bool = DEFAULT"), False),
    ],
)
def test_only_plain_model_code_is_decided_from_the_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, modeling: str, configuration: str, decided: bool
) -> None:
    folder = tmp_path / "transformers" / "models" / "toy"
    folder.mkdir(parents=True)
    (folder / "modeling_toy.py").write_text(textwrap.dedent(modeling))
    (folder / "configuration_toy.py").write_text(textwrap.dedent(configuration))
    monkeypatch.setattr(static_ties, "transformers_root", lambda: tmp_path / "transformers")
    static_ties._parse.cache_clear()
    answer = read_static({"model_type": "toy"}, "ToyForCausalLM")
    if decided:
        assert answer == [["model.embed.weight", "lm_head.weight"]]
        assert read_static({"model_type": "toy", "tie_word_embeddings": False}, "ToyForCausalLM") == []
    else:
        assert answer is None
    static_ties._parse.cache_clear()


def test_a_first_folder_conversion_needs_no_torch(tmp_path: Path) -> None:
    # With nothing cached, the tie Llama's class declares is read from the source:
    # the conversion imports neither torch nor transformers.
    torch.manual_seed(0)
    model = llama_tied()
    model.config.architectures = ["LlamaForCausalLM"]
    src = tmp_path / "llama"
    model.config.save_pretrained(src)
    state = model.state_dict()
    torch.save(
        {"model.embed_tokens.weight": state["model.embed_tokens.weight"]}, src / "pytorch_model-00001-of-00002.bin"
    )
    torch.save(
        {n: t for n, t in state.items() if n != "model.embed_tokens.weight"}, src / "pytorch_model-00002-of-00002.bin"
    )
    weight_map = {n: f"pytorch_model-0000{1 if n == 'model.embed_tokens.weight' else 2}-of-00002.bin" for n in state}
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    env_cache = tmp_path / "empty-cache"
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "converter", "convert", str(src), str(tmp_path / "out"), "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "TIESAFE_CACHE_DIR": str(env_cache)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    imported = {
        line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")
    }
    assert "converter.static_ties" in imported and "torch" not in imported and "transformers" not in imported
    report = json.loads(result.stdout)
    assert [(t["name"], t["target"], t["origin"]) for t in report["ties"]] == [
        ("lm_head.weight", "model.embed_tokens.weight", "config")
    ]


def test_the_cross_check_script_runs_and_finds_no_disagreement() -> None:
    script = Path(__file__).resolve().parent.parent / "scripts" / "check_static_ties.py"
    result = subprocess.run(
        [sys.executable, str(script), "llama", "gpt2", "bert", "t5"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = result.stdout.strip().splitlines()[-1]
    decided = int(summary.split("decided from the source: ")[1].split(";")[0])
    assert decided > 0 and summary.endswith("disagreements: 0")
