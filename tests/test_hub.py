"""prepare-upload and push: checks, the upload-ready folder, the local HF cache, a stand-in Hub."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub
import pytest
import safetensors.torch
import torch
from click.testing import CliRunner
from fake_hub import FakeHub
from models import llama_tied
from test_folder import _save_sharded
from test_safety import _Payload
from transformers import AutoModelForCausalLM, PreTrainedModel

import converter
from converter import cli
from converter.errors import TiesafeError
from converter.hub import read_facts
from converter.hub_checks import Check, check_pickles, check_shards, plan_upload

TOKEN = "hf_stand_in_token"


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    """A stand-in Hub on 127.0.0.1 (random port), stopped after the test."""
    server = FakeHub().start()
    yield server
    server.stop()


def _model(seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = llama_tied().eval()
    model.config.architectures = [type(model).__name__]  # as save_pretrained records it
    return model


def _save_folder(folder: Path, model: PreTrainedModel, state: dict[str, torch.Tensor] | None = None) -> Path:
    """A model folder as old training scripts left it: config, pytorch_model.bin, README, tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    torch.save(model.state_dict() if state is None else state, folder / "pytorch_model.bin")
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# tiny llama\n")
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    return folder


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _statuses(report: converter.UploadReport) -> dict[str, str]:
    return {c.name: c.status for c in report.checks}


def _check(report: converter.UploadReport, name: str) -> Check:
    return next(c for c in report.checks if c.name == name)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[1, 2, 3, 4, 5]])).logits


def _no_leftovers(parent: Path) -> bool:
    """No temporary folder of ours was left behind."""
    return not [p for p in parent.iterdir() if p.name.endswith(".tiesafe-tmp")]


def _run(*args: str, env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI in a fresh process (huggingface_hub reads HF_* variables on import); None unsets one."""
    environment = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    return subprocess.run([sys.executable, "-m", "converter", *args], capture_output=True, text=True, env=environment)


# --------------------------------------------------------------------------- local folders


def test_folder_with_pickles_passes_and_writes_a_clean_folder(tmp_path: Path) -> None:
    model = _model()
    src = _save_folder(tmp_path / "llama", model)
    before = _snapshot(src)
    report = converter.prepare_upload(src)
    assert _statuses(report) == dict.fromkeys(
        ["pickles", "conversion", "config", "from_pretrained", "shards", "plain_loaders"], "pass"
    )
    assert report.ok and report.output == str(tmp_path / "llama-upload")
    out = Path(report.output)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "tokenizer.json"]
    assert _snapshot(src) == before  # the source is never touched
    assert _no_leftovers(tmp_path)
    # The plan is the folder, and the pickle it replaces.
    assert {(f.path, f.size) for f in report.plan.add} == {(p.name, p.stat().st_size) for p in out.iterdir()}
    assert report.plan.delete == ["pytorch_model.bin"]
    assert report.conversion is not None and report.conversion.verified
    assert [(t.name, t.target) for t in report.conversion.ties] == [("lm_head.weight", "model.embed_tokens.weight")]
    # Upload-ready means a real (CPU) from_pretrained gives the source model's outputs.
    loaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(_logits(loaded.eval()), _logits(model))


def test_sharded_pickles_become_shards_with_a_consistent_index(tmp_path: Path) -> None:
    model = _model()
    _save_sharded(model, tmp_path / "llama")  # each shard torch.saved alone: the tie is broken in the files
    report = converter.prepare_upload(tmp_path / "llama", tmp_path / "out", max_shard_size="8KB")
    assert report.ok, report.checks
    out = Path(report.output)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert _check(report, "shards").status == "pass" and "limit 8KB" in _check(report, "shards").summary
    assert [(t.name, t.origin) for t in report.conversion.ties] == [("lm_head.weight", "config")]
    assert report.plan.delete == [
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
        "pytorch_model.bin.index.json",
    ]
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(_logits(loaded), _logits(model))


def test_tied_copies_that_differ_fail_with_the_reason(tmp_path: Path) -> None:
    model = _model()
    folder = tmp_path / "llama"
    state = _save_sharded(model, folder)
    last = sorted(folder.glob("pytorch_model-*.bin"))[-1]
    part = torch.load(last, weights_only=True)
    part["lm_head.weight"] = state["lm_head.weight"] + 1  # fine-tuned apart, config still ties them
    torch.save(part, last)
    report = converter.prepare_upload(folder, tmp_path / "out")
    assert not report.ok and report.output is None and report.plan is None
    failed = _check(report, "conversion")
    assert failed.status == "fail"
    assert "ties 'lm_head.weight' to 'model.embed_tokens.weight' but their bytes differ" in failed.summary
    assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path)
    # Kept apart on request, the config that ties them is what fails.
    report = converter.prepare_upload(folder, tmp_path / "out", allow_untied=True)
    config = _check(report, "config")
    assert config.status == "fail" and report.output is None
    assert "ties lm_head.weight to model.embed_tokens.weight" in config.details[0]
    assert "set tie_word_embeddings to false" in config.details[0]


def test_config_that_unties_tied_weights_fails(tmp_path: Path) -> None:
    model = _model()
    state = model.state_dict()  # lm_head.weight shares the embedding's storage
    model.config.tie_word_embeddings = False
    src = _save_folder(tmp_path / "llama", model, state)
    report = converter.prepare_upload(src, tmp_path / "out")
    assert _check(report, "config").status == "fail"
    assert "lm_head.weight is tied to model.embed_tokens.weight in the weights" in _check(report, "config").details[0]
    loading = _check(report, "from_pretrained")
    assert loading.status == "fail" and loading.details == ["missing: lm_head.weight"]
    assert not (tmp_path / "out").exists()


def test_a_weights_pickle_that_imports_code_is_named_and_refused(tmp_path: Path) -> None:
    sentinel = tmp_path / "ran"
    src = tmp_path / "bad"
    src.mkdir()
    torch.save({"w": torch.ones(2), "x": _Payload(os.system, f"touch {sentinel}")}, src / "pytorch_model.bin")
    report = converter.prepare_upload(src, tmp_path / "out")
    pickles = _check(report, "pickles")
    assert pickles.status == "fail" and "pytorch_model.bin" in pickles.details[0]
    assert "posix.system" in pickles.details[0]
    assert not sentinel.exists() and not (tmp_path / "out").exists()


def test_other_pickles_are_left_out_or_checked_when_kept(tmp_path: Path) -> None:
    sentinel = tmp_path / "ran"
    src = _save_folder(tmp_path / "llama", _model())
    torch.save({"lr": torch.tensor(0.1)}, src / "optimizer.pt")
    torch.save(_Payload(os.system, f"touch {sentinel}"), src / "training_args.bin")
    (src / "openvino_model.bin").write_bytes(b"\x00\x01not a pickle")  # a .bin that is no pickle is carried over
    report = converter.prepare_upload(src, tmp_path / "out")
    assert report.ok and _check(report, "pickles").status == "warn"
    assert "optimizer.pt, training_args.bin" in _check(report, "pickles").details[0]
    out = Path(report.output)
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".bin", ".pt")) == ["openvino_model.bin"]
    assert report.plan.delete == ["optimizer.pt", "pytorch_model.bin", "training_args.bin"]
    kept = converter.prepare_upload(src, tmp_path / "kept", keep_pickles=True)
    pickles = _check(kept, "pickles")
    assert pickles.status == "fail" and kept.output is None
    assert [d for d in pickles.details if d.startswith("refused")] == [
        f"refused: training_args.bin: {_refusal('posix.system')}"
    ]
    assert not sentinel.exists()


def _refusal(name: str) -> str:
    return f"refused: the pickle calls '{name}' (processes and files) — this file tries to run code"


def test_views_are_listed_for_plain_loaders_with_what_to_do(tmp_path: Path) -> None:
    src = tmp_path / "fused"
    src.mkdir()
    qkv = torch.randn(12, 4)
    torch.save({"qkv": qkv, "q": qkv[:4], "k": qkv[4:8], "v": qkv[8:]}, src / "weights.pt")
    report = converter.prepare_upload(src, tmp_path / "out")
    assert report.ok  # warnings do not stop an upload
    assert _statuses(report)["config"] == "warn" and _statuses(report)["from_pretrained"] == "warn"
    plain = _check(report, "plain_loaders")
    assert plain.status == "warn"
    assert plain.details == [f"{n}: view of qkv; pass --materialize-views to store it as a tensor" for n in "qkv"]
    report = converter.prepare_upload(src, tmp_path / "out2", materialize_views=True)
    assert _check(report, "plain_loaders").status == "pass"
    # any other X.pt becomes X.safetensors (the conventions table; what the Hub convert service writes)
    assert set(safetensors.torch.load_file(Path(report.output) / "weights.safetensors")) == {"qkv", "q", "k", "v"}


def test_a_load_that_cannot_be_tried_is_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    model.config.architectures = ["MyCustomForCausalLM"]  # custom code: never run
    report = converter.prepare_upload(_save_folder(tmp_path / "custom", model), tmp_path / "out1")
    assert report.ok and _check(report, "config").status == "warn"
    assert _check(report, "from_pretrained").summary == (
        "not checked: transformers has no class MyCustomForCausalLM (custom code: tiesafe never runs it)"
    )
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else find_spec(name, *a)
    )
    report = converter.prepare_upload(_save_folder(tmp_path / "llama", _model()), tmp_path / "out2")
    assert report.ok and _check(report, "config").status == "warn"
    assert "needs accelerate" in _check(report, "from_pretrained").summary


def test_a_safetensors_folder_is_checked_as_it_is(tmp_path: Path) -> None:
    model = _model()
    model.save_pretrained(tmp_path / "st")  # already model.safetensors
    report = converter.prepare_upload(tmp_path / "st", tmp_path / "out")
    assert report.ok and report.conversion is None
    assert _check(report, "conversion").summary.startswith("no pickle weights")
    assert _check(report, "conversion").status == "pass"
    assert _check(report, "from_pretrained").status == "pass"
    assert report.plan.delete == []
    assert _snapshot(Path(report.output)) == _snapshot(tmp_path / "st")
    (tmp_path / "st" / "onnx").mkdir()  # a subfolder is no part of the upload, and said so
    (tmp_path / "st" / ".cache").mkdir()
    report = converter.prepare_upload(tmp_path / "st", tmp_path / "out2")
    conversion = _check(report, "conversion")
    assert conversion.status == "warn" and conversion.details == ["subfolders are not carried over: onnx/"]


def test_the_source_safetensors_is_replaced_by_the_conversion(tmp_path: Path) -> None:
    src = _save_folder(tmp_path / "llama", _model())
    _model(seed=1).save_pretrained(tmp_path / "other")
    (src / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    report = converter.prepare_upload(src, tmp_path / "out")
    conversion = _check(report, "conversion")
    assert conversion.status == "warn"
    assert "model.safetensors of the source is replaced by the conversion of the pickles" in conversion.details
    converted = safetensors.torch.load_file(Path(report.output) / "model.safetensors")
    assert torch.equal(converted["model.norm.weight"], _model().state_dict()["model.norm.weight"])


def test_output_folder_must_be_new(tmp_path: Path) -> None:
    src = _save_folder(tmp_path / "llama", _model())
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("mine")
    with pytest.raises(TiesafeError, match="is not an empty folder"):
        converter.prepare_upload(src, tmp_path / "busy")
    with pytest.raises(TiesafeError, match="not the source"):
        converter.prepare_upload(tmp_path / "busy", tmp_path / "busy/../busy")
    with pytest.raises(TiesafeError, match="--revision applies to repo ids"):
        converter.prepare_upload(src, tmp_path / "out", revision="main")
    (tmp_path / "empty").mkdir()
    assert converter.prepare_upload(src, tmp_path / "empty").output == str(tmp_path / "empty")


# --------------------------------------------------------------------------- checks and plan as pure functions


def _shard_folder(folder: Path, shards: dict[str, dict[str, torch.Tensor]], weight_map: dict[str, str] | None) -> Path:
    folder.mkdir()
    for name, tensors in shards.items():
        safetensors.torch.save_file(tensors, folder / name, metadata={"format": "pt"})
    if weight_map is not None:
        total = sum(t.nbytes for tensors in shards.values() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


_A = "model-00001-of-00002.safetensors"
_B = "model-00002-of-00002.safetensors"


@pytest.mark.parametrize(
    ("case", "status", "message"),
    [
        ("good", "pass", None),
        ("missing shard", "fail", f"names {_B}, which is missing"),
        ("stale shard", "fail", "shards the index does not name (stale?): model-00001-of-00003.safetensors"),
        ("unlisted tensor", "fail", f"{_A} holds tensors the index does not place there: b"),
        ("total size", "fail", "the index's total_size is 1, the shards hold 96 bytes of tensors"),
        ("single file too", "fail", "model.safetensors beside an index"),
        ("no index", "fail", f"shards without model.safetensors.index.json: {_A}, {_B}"),
        ("too large", "fail", f"{_A} holds 64 B of tensors, over the limit of 40 B; convert with a smaller"),
        (
            "one large tensor",
            "warn",
            f"{_B} holds 64 B of tensors, over the limit of 40 B (one tensor: cannot be split)",
        ),
    ],
)
def test_shard_and_index_checks(tmp_path: Path, case: str, status: str, message: str | None) -> None:
    shards = {_A: {"a": torch.ones(8), "b": torch.ones(8)}, _B: {"c": torch.zeros(8)}}
    weight_map: dict[str, str] | None = {"a": _A, "b": _A, "c": _B}
    limit: int | str = "5GB"
    if case == "missing shard":
        shards.pop(_B)
        weight_map = {"a": _A, "b": _A, "c": _B}
    elif case == "stale shard":
        shards["model-00001-of-00003.safetensors"] = {"old": torch.ones(1)}
    elif case == "unlisted tensor":
        weight_map = {"a": _A, "c": _B}
    elif case == "single file too":
        shards["model.safetensors"] = {"z": torch.ones(1)}
    elif case == "no index":
        weight_map = None
    elif case in ("too large", "one large tensor"):
        shards[_B] = {"c": torch.zeros(16)}
        limit = 40
        if case == "one large tensor":
            shards[_A] = {"a": torch.ones(2), "b": torch.ones(2)}
    folder = _shard_folder(tmp_path / "set", shards, weight_map)
    if case == "total size":
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        index["metadata"]["total_size"] = 1
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    check = check_shards(read_facts(folder), limit)
    assert check.status == status, check
    if message is not None:
        assert any(message in d for d in check.details), check.details


def test_plan_adds_the_folder_and_deletes_what_it_replaces() -> None:
    plan = plan_upload(
        {"config.json": 10, "model.safetensors": 100},
        ["config.json", "pytorch_model.bin", "model-00001-of-00002.safetensors", "config.json"],
    )
    assert [(f.path, f.size) for f in plan.add] == [("config.json", 10), ("model.safetensors", 100)]
    assert plan.delete == ["model-00001-of-00002.safetensors", "pytorch_model.bin"]
    assert plan.bytes_to_upload == 110


def test_pickles_check_statuses() -> None:
    assert check_pickles([], [], {}).status == "pass"
    assert check_pickles(["pytorch_model.bin"], [], {}).status == "warn"
    refused = check_pickles(["x.pkl"], [], {"x.pkl": "refused: builtins.eval"})
    assert refused.status == "fail" and refused.details[0] == "refused: x.pkl: refused: builtins.eval"


# --------------------------------------------------------------------------- the local Hugging Face cache


def _cached_repo(hub: FakeHub, tmp_path: Path, cache: Path | None = None) -> tuple[Path, Path, str]:
    """A model repo on the stand-in Hub, downloaded into a fresh cache by huggingface_hub itself."""
    repo_id = "org/tiny-llama"
    folder = _save_folder(tmp_path / "published", _model())
    sha = hub.add_repo(repo_id, {p.name: p.read_bytes() for p in folder.iterdir()} | {".gitattributes": b"*.bin lfs\n"})
    cache = cache or tmp_path / "cache"
    huggingface_hub.snapshot_download(repo_id, cache_dir=cache, endpoint=hub.url, token=False)
    return folder, cache, sha


def test_a_cached_repo_is_found_by_its_id(hub: FakeHub, tmp_path: Path) -> None:
    _, cache, sha = _cached_repo(hub, tmp_path)
    requests = len(hub.requests)
    report = converter.prepare_upload("org/tiny-llama", tmp_path / "out", cache_dir=cache)
    assert len(hub.requests) == requests  # found in the cache, no network
    assert report.ok and report.commit == sha
    assert Path(report.folder).parent.parent == cache / "models--org--tiny-llama"
    assert report.plan.delete == ["pytorch_model.bin"]
    assert sorted(f.path for f in report.plan.add) == [
        ".gitattributes",
        "README.md",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    # A revision the cache lacks, and a repo it lacks: one line that says what is cached.
    with pytest.raises(TiesafeError, match=rf"at revision 'v2'.*cached: main \({sha[:7]}\)"):
        converter.prepare_upload("org/tiny-llama", tmp_path / "v2", cache_dir=cache, revision="v2")
    with pytest.raises(TiesafeError, match=r"org/absent: .*not in the local Hugging Face cache"):
        converter.prepare_upload("org/absent", tmp_path / "absent", cache_dir=cache)
    with pytest.raises(TiesafeError, match="no such folder, and not a repo id"):
        converter.prepare_upload("no/such/folder", tmp_path / "absent", cache_dir=cache)
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(TiesafeError, match="is a file: prepare-upload takes a model folder"):
        converter.prepare_upload(tmp_path / "model.bin", tmp_path / "absent", cache_dir=cache)


def test_cli_finds_the_cache_from_the_environment_offline(hub: FakeHub, tmp_path: Path) -> None:
    home = tmp_path / "hf-home"
    _, cache, sha = _cached_repo(hub, tmp_path, cache=home / "hub")  # where HF_HOME puts the cache
    offline: dict[str, str | None] = {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    requests = len(hub.requests)
    env = {**offline, "HF_HOME": str(home), "HF_HUB_CACHE": None}
    result = _run("prepare-upload", "org/tiny-llama", "--out", str(tmp_path / "out"), "--json", env=env)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["ok"] is True and data["commit"] == sha and data["output"] == str(tmp_path / "out")
    assert {c["name"]: c["status"] for c in data["checks"]}["from_pretrained"] == "pass"
    assert len(hub.requests) == requests
    missing = _run(
        "prepare-upload", "org/absent", "--out", str(tmp_path / "x"), env={**offline, "HF_HUB_CACHE": str(cache)}
    )
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert "not in the local Hugging Face cache" in missing.stderr


# --------------------------------------------------------------------------- push


def test_push_commits_exactly_the_plan(hub: FakeHub, tmp_path: Path) -> None:
    _, cache, sha = _cached_repo(hub, tmp_path)
    report = converter.prepare_upload("org/tiny-llama", tmp_path / "out", cache_dir=cache)
    out = Path(report.output)
    result = converter.push(report, "org/tiny-llama", endpoint=hub.url, token=TOKEN)
    [commit] = hub.commits
    assert commit.added == {f.path: (out / f.path).read_bytes() for f in report.plan.add}
    assert commit.deleted == ["pytorch_model.bin"] == result.deleted
    assert commit.parent == sha and not commit.create_pr and commit.revision == "main"
    assert [r.headers["authorization"] for r in hub.calls("commit")] == [f"Bearer {TOKEN}"]
    assert result.commit_url.endswith(commit.oid) and result.pr_url is None
    # The repo now holds exactly the folder: every other file was replaced or deleted.
    files = hub.repos["org/tiny-llama"].files
    assert set(files) == {f.path for f in report.plan.add}
    assert files["model.safetensors"] == (out / "model.safetensors").read_bytes()


def test_push_deletes_only_what_the_hub_holds(hub: FakeHub, tmp_path: Path) -> None:
    src = _save_folder(tmp_path / "llama", _model())
    hub.add_repo("me/new", {"README.md": b"# placeholder\n"})
    report = converter.prepare_upload(src, tmp_path / "out")
    result = converter.push(report, "me/new", endpoint=hub.url, token=TOKEN, message="First weights")
    [commit] = hub.commits
    assert commit.deleted == [] == result.deleted and result.not_on_hub == ["pytorch_model.bin"]
    assert commit.summary == "First weights"
    assert set(commit.added) == {"README.md", "config.json", "model.safetensors", "tokenizer.json"}
    with pytest.raises(TiesafeError, match=r"push to me/absent failed: .*\(does it exist, and may your token"):
        converter.push(report, "me/absent", endpoint=hub.url, token=TOKEN)
    assert len(hub.commits) == 1


def test_push_is_refused_when_a_check_failed_or_no_token(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model()
    model.config.tie_word_embeddings = False
    failed = converter.prepare_upload(_save_folder(tmp_path / "bad", model, model.state_dict()), tmp_path / "o1")
    hub.add_repo("me/x", {})
    with pytest.raises(TiesafeError, match=r"not pushed: checks failed \(config, from_pretrained\)"):
        converter.push(failed, "me/x", endpoint=hub.url, token=TOKEN)
    good = converter.prepare_upload(_save_folder(tmp_path / "good", _model()), tmp_path / "o2")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(TiesafeError, match="no Hugging Face token: run `hf auth login` or set HF_TOKEN"):
        converter.push(good, "me/x", endpoint=hub.url)
    (Path(good.output) / "config.json").write_text("{}")
    with pytest.raises(TiesafeError, match=r"config\.json changed since the checks"):
        converter.push(good, "me/x", endpoint=hub.url, token=TOKEN)
    assert hub.requests == []


@pytest.mark.parametrize(
    ("endpoint", "status"), [("preupload", 403), ("commit", 500), ("info", 404), ("validate-yaml", 400)]
)
def test_failing_endpoint_gives_one_line_and_keeps_the_folder(
    hub: FakeHub, tmp_path: Path, endpoint: str, status: int
) -> None:
    _, cache, _ = _cached_repo(hub, tmp_path)
    report = converter.prepare_upload("org/tiny-llama", tmp_path / "out", cache_dir=cache)
    before = _snapshot(Path(report.output))
    files = dict(hub.repos["org/tiny-llama"].files)
    hub.fail[endpoint] = status
    with pytest.raises(TiesafeError) as error:
        converter.push(report, "org/tiny-llama", endpoint=hub.url, token=TOKEN)
    message = str(error.value)
    assert message.startswith("push to org/tiny-llama failed: ")
    assert (str(status) if endpoint != "validate-yaml" else "Invalid metadata in README.md") in message
    assert "\n" not in message and message.endswith("the local folder is unchanged")
    assert _snapshot(Path(report.output)) == before
    assert hub.repos["org/tiny-llama"].files == files and hub.commits == []


def test_cli_pushes_a_pull_request(hub: FakeHub, tmp_path: Path) -> None:
    _, cache, _ = _cached_repo(hub, tmp_path)
    env = {"HF_HUB_CACHE": str(cache), "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "home")}
    main_files = dict(hub.repos["org/tiny-llama"].files)
    out = tmp_path / "out"
    args = ["prepare-upload", "org/tiny-llama", "--out", str(out), "--push", "org/tiny-llama", "--pr"]
    result = _run(*args, "--message", "Convert to safetensors", env=env)
    assert result.returncode == 0, result.stderr
    [commit] = hub.commits
    assert commit.create_pr and commit.summary == "Convert to safetensors"
    assert f"pushed to org/tiny-llama: {hub.url}/org/tiny-llama/discussions/1" in result.stdout
    assert "delete on the Hub, where present: pytorch_model.bin" in result.stdout
    assert hub.repos["org/tiny-llama"].files == main_files  # a PR leaves main alone
    assert set(hub.repos["org/tiny-llama"].prs[0]) == {".gitattributes", *(p.name for p in out.iterdir())}
    # The endpoint failing: the report, then one error line, exit 2, folder intact.
    hub.fail["commit"] = 500
    before = _snapshot(out)
    args = ["prepare-upload", "org/tiny-llama", "--out", str(tmp_path / "again"), "--push", "org/tiny-llama"]
    failed = _run(*args, env=env)
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines()[-1].startswith("tiesafe: error: push to org/tiny-llama failed: ")
    assert "Internal Server Error" in failed.stderr and "upload plan" in failed.stdout
    assert _snapshot(out) == before and (tmp_path / "again" / "model.safetensors").is_file()


def test_cli_exit_code_and_json_when_a_check_fails(tmp_path: Path) -> None:
    model = _model()
    model.config.tie_word_embeddings = False
    src = _save_folder(tmp_path / "llama", model, model.state_dict())
    runner = CliRunner()
    result = runner.invoke(cli.main, ["prepare-upload", str(src), "--json", "--push", "me/never"])
    assert result.exit_code == 2
    data = json.loads(result.stdout)
    assert data["ok"] is False and data["output"] is None and data["push"] is None
    assert [c["name"] for c in data["checks"] if c["status"] == "fail"] == ["config", "from_pretrained"]
    text = runner.invoke(cli.main, ["prepare-upload", str(src)])
    assert text.exit_code == 2 and "not ready to upload: config, from_pretrained failed" in text.stdout
    usage = runner.invoke(cli.main, ["prepare-upload", str(src), "--pr"])
    assert usage.exit_code == 2 and "--pr and --message go with --push" in usage.output
    assert not (tmp_path / "llama-upload").exists()


def test_a_kept_pickle_with_foreign_objects_fails_even_though_convert_reads_it(tmp_path: Path) -> None:
    """The Trainer's training_args.bin is a pickled TrainingArguments: inert for tiesafe, run by whoever loads it."""
    from transformers import TrainingArguments

    src = _save_folder(tmp_path / "llama", _model())
    torch.save(TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[]), src / "training_args.bin")
    kept = converter.prepare_upload(src, tmp_path / "kept", keep_pickles=True)
    pickles = _check(kept, "pickles")
    assert pickles.status == "fail" and kept.output is None
    assert any(
        d.startswith("refused: training_args.bin: refused: the pickle asks for 'transformers.training_args.")
        for d in pickles.details
    ), pickles.details
    assert converter.prepare_upload(src, tmp_path / "out").ok  # left out of the upload, it blocks nothing
