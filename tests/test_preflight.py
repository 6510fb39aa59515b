"""Preflight: every input of a run is checked before anything loads, all problems at once, and
nothing is asked of the Hub (every test here fails on a network call)."""

import json
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from rdpo.config import ConfigError, load_config
from rdpo.preflight import HubError, check_inputs, hub_errors, looks_like_hub_id

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "qwen2_5_vl_7b_qlora.yaml"
CHECKPOINT_FILES = ("config.json", "processor_config.json", "tokenizer.json", "model.safetensors")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection attempt is recorded and fails; the test fails if there was one."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network blocked by tests/test_preflight.py")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    yield
    assert not attempts, f"network calls: {attempts}"


def checkpoint(path: Path, files=CHECKPOINT_FILES) -> Path:
    """A directory with the file names of a checkpoint (empty files: nothing loads them)."""
    path.mkdir(parents=True, exist_ok=True)
    for name in files:
        (path / name).write_text("{}")
    return path


def record(rid="p1", **changes) -> dict:
    out = {"id": rid, "images": ["red.png"], "instruction": "What colour is the square?",
           "rubric": {"essential": [{"id": "e1", "text": "Says red."}]}}
    out.update(changes)
    return out


def pool(path: Path, lines) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), "red").save(path.parent / "red.png")
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def config(tmp_path, *overrides):
    """A config whose inputs are all fine unless an override says otherwise."""
    return load_config(None, [f"run.dir={tmp_path / 'run'}",
                              f"model.path={checkpoint(tmp_path / 'ckpt')}",
                              f"data.train_pool={pool(tmp_path / 'train.jsonl', [record()])}",
                              *overrides])


def problems(cfg) -> list[str]:
    with pytest.raises(ConfigError) as err:
        check_inputs(cfg)
    return err.value.problems


def test_good_inputs_pass(tmp_path):
    heldout = pool(tmp_path / "held" / "heldout.jsonl", [record("h1")])
    check_inputs(config(tmp_path, f"data.heldout_pool={heldout}"))


def test_the_tiny_saved_model_passes(tmp_path, tiny_dir):
    check_inputs(config(tmp_path, f"model.path={tiny_dir}"))


def test_recipe_checkpoint_path_missing_offline(tmp_path, monkeypatch):
    """The shipped recipe's checkpoints/... before the download: one line, no Hub attempt."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    [line] = problems(config(tmp_path, "model.path=checkpoints/Qwen2.5-VL-7B-Instruct"))
    assert line.startswith("model.path: no such directory: checkpoints/Qwen2.5-VL-7B-Instruct")
    assert "HF_HUB_OFFLINE=1" in line and "\n" not in line


def test_missing_directory_under_a_local_folder_is_not_a_hub_id(tmp_path, monkeypatch):
    """Online too: with checkpoints/ present, checkpoints/X is a local path, never looked up."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    [line] = problems(config(tmp_path, "model.path=checkpoints/Qwen2.5-VL-7B-Instruct"))
    assert line == ("model.path: no such directory: checkpoints/Qwen2.5-VL-7B-Instruct (a local "
                    "checkpoint directory, or a Hub id org/name with the Hub reachable)")


def test_directory_without_model_or_processor(tmp_path):
    empty = tmp_path / "tmpdir"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a model")
    [line] = problems(config(tmp_path, f"model.path={empty}"))
    assert line.startswith(f"model.path: {empty} is not a transformers checkpoint")
    for part in ("no config.json", "no processor config (processor_config.json or "
                 "preprocessor_config.json)", "no tokenizer", "no weights"):
        assert part in line


def test_model_without_processor(tmp_path):
    model_only = checkpoint(tmp_path / "model_only", ("config.json", "model.safetensors"))
    [line] = problems(config(tmp_path, f"model.path={model_only}"))
    assert "no processor config" in line and "no tokenizer" in line and "config.json," not in line


def test_interrupted_sharded_download(tmp_path):
    ckpt = checkpoint(tmp_path / "sharded", ("config.json", "preprocessor_config.json",
                                             "vocab.json", "model-00001-of-00002.safetensors"))
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors",
                            "b": "model-00002-of-00002.safetensors"}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    [line] = problems(config(tmp_path, f"model.path={ckpt}"))
    assert "no weight shards model-00002-of-00002.safetensors" in line


@pytest.mark.parametrize("var,value", [("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "yes"),
                                       ("HF_HUB_OFFLINE", "ON")])
def test_hub_id_while_offline(tmp_path, monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    [line] = problems(config(tmp_path, "model.path=acme-test/no-such-vlm"))
    assert line.startswith("model.path: no such directory: acme-test/no-such-vlm")
    assert f"the Hub is offline ({var}={value})" in line


def hub(monkeypatch, answer):
    """Stand-in for the one metadata request preflight makes of the Hub."""
    calls = []

    def model_info(self, repo_id, **kwargs):
        calls.append(repo_id)
        if isinstance(answer, BaseException):
            raise answer
        return SimpleNamespace(siblings=[SimpleNamespace(rfilename=f) for f in answer])

    monkeypatch.setattr("huggingface_hub.HfApi.model_info", model_info)
    return calls


def test_hub_id_online_is_accepted_without_download(tmp_path, monkeypatch):
    calls = hub(monkeypatch, ["config.json", "preprocessor_config.json", "tokenizer.json",
                              "model-00001-of-00002.safetensors", "README.md"])
    check_inputs(config(tmp_path, "model.path=Qwen/Qwen2.5-VL-7B-Instruct"))
    assert calls == ["Qwen/Qwen2.5-VL-7B-Instruct"]


def test_hub_repo_without_processor(tmp_path, monkeypatch):
    hub(monkeypatch, ["config.json", "model.safetensors"])
    [line] = problems(config(tmp_path, "model.path=acme/text-only"))
    assert line.startswith("model.path: acme/text-only is not a transformers checkpoint")


def test_hub_repo_not_found(tmp_path, monkeypatch):
    from huggingface_hub.errors import RepositoryNotFoundError

    err = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # its constructor wants a response
    OSError.__init__(err, "404 Repository Not Found")
    hub(monkeypatch, err)
    [line] = problems(config(tmp_path, "model.path=checkpoints/Qwen2.5-VL-7B-Instruct"))
    assert "no such directory: checkpoints/Qwen2.5-VL-7B-Instruct, nor a Hub repo" in line


def test_hub_unreachable_fails_at_once(tmp_path, monkeypatch):
    hub(monkeypatch, ConnectionError("[Errno -2] Name or service not known"))
    [line] = problems(config(tmp_path, "model.path=acme/vlm"))
    assert "cannot be reached (ConnectionError: [Errno -2] Name or service not known)" in line


@pytest.mark.parametrize("value,hub_like", [
    ("Qwen/Qwen2.5-VL-7B-Instruct", True), ("checkpoints/Qwen2.5-VL-7B-Instruct", True),
    ("a/b", True), ("/tmp", False), ("./x/y", False), ("a/b/c", False), ("name", False),
    ("org/-name", False), ("org/na--me", False), ("org/na..me", False), ("org/näme", False),
])
def test_hub_id_shape(value, hub_like):
    assert looks_like_hub_id(value) is hub_like


def test_transformers_judge_checked_too(tmp_path):
    [line] = problems(config(tmp_path, "judge.kind=transformers", "judge.model=/no/such/judge"))
    assert line.startswith("judge.model: no such directory: /no/such/judge")
    # the openai judge's model is a served name, not a path
    check_inputs(config(tmp_path, "judge.kind=openai", "judge.model=/no/such/judge",
                        "judge.base_url=http://localhost:1/v1"))


def test_bad_pool_lines_as_rubrics_validate_prints_them(tmp_path, capsys):
    from rdpo.tools.rubrics import main as rubrics_main

    bad = pool(tmp_path / "bad" / "pool.jsonl",
               [record("p1"), "{not json", record("p3", rubric={"essential": []}),
                record("p1", images=["missing.png"])])
    assert rubrics_main(["validate", str(bad)]) == 1
    expected = capsys.readouterr().err.splitlines()
    assert len(expected) == 4
    got = problems(config(tmp_path, f"data.train_pool={bad}"))
    assert got == [f"data.train_pool: {line}" for line in expected]


def test_pool_problems_are_capped(tmp_path):
    bad = pool(tmp_path / "bad" / "pool.jsonl", ["{"] * 25)
    # one file as both pools: its problems once
    got = problems(config(tmp_path, f"data.train_pool={bad}", f"data.heldout_pool={bad}"))
    assert len(got) == 21 and got[-1].startswith("data.train_pool: ... and 5 more problems")


def test_recipe_lists_every_problem_at_once(tmp_path, monkeypatch):
    """The shipped recipe before anything is downloaded or built, plus two more bad inputs."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(RECIPE, ["judge.kind=transformers", "judge.model=/no/such/judge",
                               "run.resume=/no/such/last.ckpt"])
    got = problems(cfg)
    assert [line.split(":")[0] for line in got] == [
        "model.path", "judge.model", "data.train_pool", "data.heldout_pool", "run.resume"]
    assert got[2] == "data.train_pool: no such file: data/rubric_pool/train.jsonl"


def test_toy_paths_are_left_to_the_toy_build(tmp_path):
    """The toy's model and pools are built after the check (prepare_toy): not checked, but a
    path set by hand beside the toy is."""
    args = [f"run.dir={tmp_path / 'run'}", f"toy.cache_dir={tmp_path / 'cache'}"]
    check_inputs(load_config(ROOT / "configs" / "quickstart.yaml", args))
    cfg = load_config(ROOT / "configs" / "quickstart.yaml",
                      [*args, f"data.heldout_pool={tmp_path / 'mine.jsonl'}"])
    assert problems(cfg) == [f"data.heldout_pool: no such file: {tmp_path / 'mine.jsonl'}"]
    assert not (tmp_path / "cache").exists()


def fail_if_loaded(monkeypatch):
    def load_policy(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr("rdpo.model.load_policy", load_policy)


def test_cli_missing_train_pool_before_any_model_loads(tmp_path, monkeypatch, capsys):
    from rdpo.fit import main

    fail_if_loaded(monkeypatch)
    rc = main(["--config", str(RECIPE), f"run.dir={tmp_path / 'run'}",
               f"model.path={checkpoint(tmp_path / 'ckpt')}",
               f"data.train_pool={tmp_path / 'nope.jsonl'}", "data.heldout_pool=null"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: invalid config:")
    assert f"data.train_pool: no such file: {tmp_path / 'nope.jsonl'}" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing written either


def test_cli_bad_pool(tmp_path, monkeypatch, capsys):
    from rdpo.fit import main
    from rdpo.tools.rubrics import main as rubrics_main

    fail_if_loaded(monkeypatch)
    bad = pool(tmp_path / "pool.jsonl", [record("p1"), record("p2", rubric={"essential": "x"})])
    rubrics_main(["validate", str(bad)])
    expected = capsys.readouterr().err.splitlines()
    rc = main(["--config", str(RECIPE), f"run.dir={tmp_path / 'run'}",
               f"model.path={checkpoint(tmp_path / 'ckpt')}", f"data.train_pool={bad}",
               "data.heldout_pool=null"])
    err = capsys.readouterr().err
    assert rc == 2 and expected and "Traceback" not in err
    for line in expected:
        assert line.startswith(f"{bad}:2: rubric.essential")
        assert f"data.train_pool: {line}" in err


def test_failed_hub_download_is_one_clear_error(monkeypatch):
    transformers = pytest.importorskip("transformers")
    from rdpo.model import load_processor

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\n"
                      "Check your internet connection.")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", offline)
    with pytest.raises(HubError) as err:
        load_processor("acme/vlm")
    message = str(err.value)
    assert message.startswith("model.path: could not download acme/vlm from the Hugging Face "
                              "Hub: We couldn't connect") and "\n" not in message


def test_local_load_errors_pass_through(tmp_path):
    with pytest.raises(OSError, match="disk") as err, hub_errors("model.path", str(tmp_path)):
        raise OSError("disk on fire")
    assert not isinstance(err.value, HubError)
