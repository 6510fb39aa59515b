"""Inputs a run refuses (issue 23, item 12): oversized images, pool paths outside the pool's
folder, non-finite or negative settings; and images reach a remote judge without metadata."""

import base64
import dataclasses
import io
import json
import logging
import os
import typing
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rdpo import config as schema
from rdpo.config import ConfigError, JudgeConfig, load_config
from rdpo.confighelp import add_options, section_from_args
from rdpo.judging.chat import data_url
from rdpo.pool import PoolError, check_pool, load_images, load_pool

RUBRIC = {"essential": [{"id": "E1", "text": "Says red."}]}


def write_pool(folder: Path, *images: str, name: str = "pool.jsonl", instruction: str = "Q?") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("".join(json.dumps({"id": str(i), "images": [image],
                                        "instruction": instruction, "rubric": RUBRIC}) + "\n"
                            for i, image in enumerate(images)))
    return path


def png(path: Path, size=(8, 8), color=(255, 0, 0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width × height (nothing behind it decodes): what PIL reads
    before any pixel, as a decompression bomb's is."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (len(data).to_bytes(4, "big") + kind + data
                + zlib.crc32(kind + data).to_bytes(4, "big"))

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


# -- image size -----------------------------------------------------------------------------

def test_an_image_above_the_pixel_bound_is_refused_before_decoding(tmp_path):
    png(tmp_path / "small.png", (10, 10))
    png_header(tmp_path / "bomb.png", 30_000, 30_000)  # 900M pixels: above PIL's 2x limit too
    png(tmp_path / "wide.png", (200, 100))
    pool = write_pool(tmp_path, "small.png", "bomb.png", "wide.png")
    _, problems = check_pool(pool, max_pixels=10_000)
    assert [(p.line, p.field) for p in problems] == [(2, "images[0]"), (3, "images[0]")]
    assert "above the bound of 10,000 pixels" in problems[1].message
    assert "200x100 = 20,000 pixels" in problems[1].message
    assert "data.max_image_pixels" in str(problems[0]) and "bomb.png" in str(problems[0])
    # the default bound is PIL's own limit: the bomb is refused, a normal image is not
    _, problems = check_pool(pool)
    assert [p.line for p in problems] == [2] and "data.max_image_pixels" in problems[0].message
    assert check_pool(pool, max_pixels=20_000)[1][0].line == 2


def test_a_bound_above_pils_limit_raises_it(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    png(tmp_path / "a.png", (50, 50))  # 2,500 pixels: above twice PIL's limit
    pool = write_pool(tmp_path, "a.png")
    assert "above the bound of 1,000" in str(check_pool(pool, max_pixels=1000)[1][0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        records = load_pool(pool, max_pixels=3000)
        assert Image.MAX_IMAGE_PIXELS == 3000  # what validation accepted, PIL opens
        assert load_images(records[0])[0].size == (50, 50)
    load_pool(pool, max_pixels=2500)
    assert Image.MAX_IMAGE_PIXELS == 3000  # never lowered


# -- paths outside the pool's folder --------------------------------------------------------

def test_paths_outside_the_pool_folder_are_refused(tmp_path):
    pools = tmp_path / "pools"
    png(pools / "images" / "in.png")
    outside = png(tmp_path / "secret.png")
    (pools / "images" / "link_out.png").symlink_to(outside)
    (pools / "images" / "link_in.png").symlink_to(pools / "images" / "in.png")
    pool = write_pool(pools, "images/in.png", str(outside), "../secret.png",
                      "images/../../secret.png", "images/link_out.png", "images/link_in.png")
    records, problems = check_pool(pool)
    assert [r.id for r in records] == ["0", "5"]
    assert [(p.line, p.field) for p in problems] == [(n, "images[0]") for n in (2, 3, 4, 5)]
    for p in problems:
        assert f"is outside the pool's folder {pools.resolve()}" in p.message
        assert "data.allow_outside_paths=true" in p.message
    assert str(problems[0]).startswith(f"{pool}:2: images[0]: {outside}")
    records, problems = check_pool(pool, allow_outside=True)
    assert not problems and len(records) == 6
    # structure only (open_images=False): nothing about the files is checked
    assert not check_pool(pool, open_images=False)[1]


def test_video_frames_outside_are_refused_too(tmp_path):
    png(tmp_path / "p" / "f.png")
    outside = png(tmp_path / "f.png")
    pool = tmp_path / "p" / "pool.jsonl"
    pool.write_text(json.dumps({"id": "v", "images": [], "video": ["f.png", str(outside)],
                                "instruction": "Q", "rubric": RUBRIC}) + "\n")
    [problem] = check_pool(pool)[1]
    assert problem.field == "video[1]" and "outside" in problem.message


@pytest.fixture
def checkpoint(tmp_path):
    """A folder with the file names preflight looks for in model.path (nothing loads it)."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in ("config.json", "processor_config.json", "tokenizer.json", "model.safetensors"):
        (folder / name).write_text("{}")
    return folder


@pytest.fixture
def outside_pool(tmp_path):
    outside = png(tmp_path / "elsewhere" / "x.png")
    return write_pool(tmp_path / "pools", str(outside))


def test_preflight_refuses_an_outside_path_with_its_setting(outside_pool, checkpoint, tmp_path):
    from rdpo.preflight import check_inputs

    args = [f"run.dir={tmp_path / 'run'}", f"model.path={checkpoint}",
            f"data.train_pool={outside_pool}"]
    with pytest.raises(ConfigError) as err:
        check_inputs(load_config(None, args))
    [line] = err.value.problems
    assert line.startswith(f"data.train_pool: {outside_pool}:1: images[0]: ")
    assert "data.allow_outside_paths=true" in line
    check_inputs(load_config(None, [*args, "data.allow_outside_paths=true"]))
    with pytest.raises(ConfigError, match=r"data.train_pool: .*above the bound of 10 pixels"):
        check_inputs(load_config(None, [*args, "data.allow_outside_paths=true",
                                        "data.max_image_pixels=10"]))


def test_the_data_module_loads_with_the_run_settings(outside_pool):
    from rdpo.config import DataConfig
    from rdpo.data import OnPolicyDataModule

    with pytest.raises(PoolError, match="outside the pool's folder"):
        OnPolicyDataModule(DataConfig(str(outside_pool)))._load_pools()
    dm = OnPolicyDataModule(DataConfig(str(outside_pool), allow_outside_paths=True))
    dm._load_pools()
    assert len(dm.records) == 1
    with pytest.raises(PoolError, match="above the bound of 10 pixels"):
        OnPolicyDataModule(DataConfig(str(outside_pool), allow_outside_paths=True,
                                      max_image_pixels=10))._load_pools()


# -- held-out contamination -----------------------------------------------------------------

def test_preflight_warns_when_a_heldout_prompt_repeats_a_training_prompt(tmp_path, checkpoint,
                                                                         caplog):
    from rdpo.preflight import check_inputs

    png(tmp_path / "p" / "a.png", color=(255, 0, 0))
    png(tmp_path / "p" / "b.png", color=(0, 255, 0))
    png(tmp_path / "p" / "copy_of_a.png", color=(255, 0, 0))
    train = write_pool(tmp_path / "p", "a.png", "b.png", name="train.jsonl")
    clean = write_pool(tmp_path / "p", "b.png", name="clean.jsonl", instruction="Other?")
    leaky = write_pool(tmp_path / "p", "b.png", "copy_of_a.png", name="leaky.jsonl")
    base = [f"run.dir={tmp_path / 'run'}", f"model.path={checkpoint}", f"data.train_pool={train}"]
    with caplog.at_level(logging.WARNING, logger="rdpo"):
        check_inputs(load_config(None, [*base, f"data.heldout_pool={clean}"]))
    assert "repeat a training prompt" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="rdpo"):
        check_inputs(load_config(None, [*base, f"data.heldout_pool={leaky}"]))
    # leaky:1 (id 0) shows b.png = train:2 (id 1); leaky:2 shows a copy of a.png = train:1
    assert "data.heldout_pool: 2 of its 2 prompts repeat a training prompt" in caplog.text
    assert f"{leaky}:1 (0) = {train}:2 (1)" in caplog.text
    assert f"{leaky}:2 (1) = {train}:1 (0)" in caplog.text


# -- settings: finite bounds, no negative counts --------------------------------------------

def _fields(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hints[f.name], f


FLOATS = [key for key, kind, _ in _fields(schema.Config) if kind is float]
INTS = [(key, f) for key, kind, f in _fields(schema.Config) if kind is int]
SEEDS = {"run.seed", "toy.task_seed"}
"""The int settings that are not counts or sizes: any integer is a seed."""


def test_schema_has_floats_and_ints():
    assert {"dpo.lr", "rollout.timeout", "judge.timeout", "model.lora.dropout"} <= set(FLOATS)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", ".inf"])
def test_every_float_setting_refuses_non_finite(value, tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config("configs/quickstart.yaml", [f"run.dir={tmp_path}",
                                                *(f"{key}={value}" for key in FLOATS)])
    named = {line.split(":")[0] for line in err.value.problems}
    assert set(FLOATS) <= named
    finite = [line for line in err.value.problems if "must be a finite number" in line]
    assert {line.split(":")[0] for line in finite} == set(FLOATS)


def test_every_count_refuses_negatives(tmp_path):
    counts = [key for key, _ in INTS if key not in SEEDS]
    for key, f in INTS:  # every int setting but a seed says its lower bound
        assert key in SEEDS or {"ge", "gt", "choices"} & set(f.metadata), key
    with pytest.raises(ConfigError) as err:
        load_config("configs/quickstart.yaml", [f"run.dir={tmp_path}",
                                                *(f"{key}=-1" for key in counts)])
    assert {line.split(":")[0] for line in err.value.problems} == set(counts)
    load_config("configs/quickstart.yaml", [f"run.dir={tmp_path}", "run.seed=-1"])


def test_named_settings_refuse_inf(tmp_path):
    for key in ("dpo.lr", "rollout.timeout", "judge.timeout", "pairs.min_margin"):
        with pytest.raises(ConfigError, match=rf"{key}: must be a finite number, got inf"):
            load_config("configs/quickstart.yaml", [f"run.dir={tmp_path}", f"{key}=inf"])


def test_cli_options_refuse_inf():
    import argparse

    parser = argparse.ArgumentParser()
    add_options(parser, JudgeConfig, ["timeout", "max_retries"])
    _, problems = section_from_args(JudgeConfig, parser.parse_args(["--timeout", "inf"]),
                                    ["timeout", "max_retries"])
    assert problems == ["--timeout: must be a finite number, got inf"]
    _, problems = section_from_args(JudgeConfig, parser.parse_args(["--max-retries", "-1"]),
                                    ["timeout", "max_retries"])
    assert problems == ["--max-retries: must be >= 0, got -1"]


# -- images sent to a remote judge ----------------------------------------------------------

def _sent(url: str) -> bytes:
    return base64.b64decode(url.split(",", 1)[1])


def _exif() -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F] = "SecretCam"  # camera make
    exif[0x0112] = 6  # orientation
    exif[0x8825] = {1: "N", 2: (48.0, 51.0, 24.0)}  # GPS
    return exif


@pytest.mark.parametrize("progressive", [False, True])
def test_a_jpeg_is_sent_without_metadata_and_with_the_same_pixels(tmp_path, progressive):
    pixels = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    path = tmp_path / "photo.jpg"
    Image.fromarray(pixels).save(path, exif=_exif(), comment=b"private note", quality=90,
                                 progressive=progressive, icc_profile=b"\0" * 200)
    assert b"SecretCam" in path.read_bytes()
    url = data_url(path)
    sent = _sent(url)
    assert url.startswith("data:image/jpeg;base64,")
    assert b"SecretCam" not in sent and b"private note" not in sent and len(sent) < path.stat().st_size
    with Image.open(io.BytesIO(sent)) as im, Image.open(path) as src:
        assert not im.getexif() and not {"exif", "icc_profile", "comment"} & set(im.info)
        assert im.convert("RGB").tobytes() == src.convert("RGB").tobytes()  # coded data kept


def test_other_images_are_sent_as_plain_png_of_what_the_policy_sees(tmp_path):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "Secret Person")
    path = tmp_path / "a.png"
    Image.new("RGBA", (6, 4), (10, 20, 30, 128)).save(path, pnginfo=info, exif=_exif())
    sent = _sent(data_url(path))
    assert b"Secret" not in sent
    rec = load_pool(write_pool(tmp_path, "a.png"))[0]
    with Image.open(io.BytesIO(sent)) as im:
        assert im.format == "PNG" and not im.info and not im.getexif()
        assert im.tobytes() == load_images(rec)[0].tobytes()


def test_an_edited_image_is_sent_as_edited(tmp_path):
    path = png(tmp_path / "a.png", color=(255, 0, 0))
    first = data_url(path)
    png(path, color=(0, 0, 255))
    os.utime(path, ns=(1, 1))  # a new modification time, as any edit gives
    assert data_url(path) != first
