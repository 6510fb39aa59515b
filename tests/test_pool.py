from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from rdpo.pool import (
    Criterion,
    PoolError,
    Problem,
    check_pool,
    load_images,
    load_pool,
    write_pool,
)
from rdpo.tools.rubrics import main


def record(rid: str = "p0", **over) -> dict:
    rec = {
        "id": rid,
        "images": ["images/red.png"],
        "instruction": "What color is the circle?",
        "reference": "The circle is red.",
        "rubric": {
            "essential": [
                {
                    "id": "E1",
                    "text": "States that the circle is red.",
                    "check": {"any": [r"\bred\b"]},
                }
            ],
            "additional": [
                {"id": "A1", "text": "Says there is exactly one circle.", "weight": 1.0},
                {
                    "id": "A2",
                    "text": "No triangle.",
                    "weight": 0.5,
                    "check": {"none": ["triangle"]},
                },
            ],
        },
    }
    rec.update(over)
    return rec


@pytest.fixture
def pool_dir(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    Image.new("RGB", (4, 3), (255, 0, 0)).save(tmp_path / "images" / "red.png")
    Image.new("L", (2, 2), 128).save(tmp_path / "images" / "gray.png")
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png at all")
    # A valid header with the data cut off: PIL opens it lazily, only verify() notices.
    Image.new("RGB", (64, 64), (0, 0, 255)).save(tmp_path / "images" / "blue.png")
    full = (tmp_path / "images" / "blue.png").read_bytes()
    (tmp_path / "images" / "truncated.png").write_bytes(full[: len(full) // 2])
    return tmp_path


def write_lines(path: Path, lines: list) -> Path:
    path.write_text(
        "".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines),
        encoding="utf-8",
    )
    return path


def test_valid_pool_loads_with_resolved_paths(pool_dir: Path):
    pool = write_lines(
        pool_dir / "pool.jsonl",
        [record("a"), "", "   ", record("b", images=["images/red.png", "images/gray.png"])],
    )
    records = load_pool(pool)
    assert [r.id for r in records] == ["a", "b"]
    a, b = records
    assert a.images == ((pool_dir / "images" / "red.png").resolve(),)
    assert all(p.is_absolute() for p in b.images) and len(b.images) == 2
    assert a.source == f"{pool}:1" and b.source == f"{pool}:4"
    assert a.reference == "The circle is red."
    assert [c.id for c in a.rubric.criteria()] == ["E1", "A1", "A2"]
    assert a.rubric.essential[0] == Criterion(
        "E1", "States that the circle is red.", 1.0, {"any": (r"\bred\b",)}
    )
    assert a.rubric.additional[1].weight == 0.5
    assert a.rubric.additional[0].check is None
    imgs = load_images(b)
    assert [im.mode for im in imgs] == ["RGB", "RGB"]
    assert imgs[0].size == (4, 3) and imgs[0].getpixel((0, 0)) == (255, 0, 0)


def test_pool_paths_relative_to_pool_file_not_cwd(pool_dir: Path, monkeypatch):
    pool = write_lines(pool_dir / "pool.jsonl", [record()])
    monkeypatch.chdir(pool_dir / "images")
    assert load_pool(pool)[0].images[0] == (pool_dir / "images" / "red.png").resolve()


def test_optional_fields(pool_dir: Path):
    rec = record()
    del rec["reference"]
    del rec["rubric"]["additional"]
    rec2 = record("q", reference=None)
    rec2["rubric"]["additional"] = []
    records = load_pool(write_lines(pool_dir / "pool.jsonl", [rec, rec2]))
    assert records[0].reference is None and records[0].rubric.additional == ()
    assert records[1].reference is None


def test_rubric_to_json_round_trip(pool_dir: Path):
    rec = record()
    loaded = load_pool(write_lines(pool_dir / "pool.jsonl", [rec]))[0]
    assert loaded.rubric.to_json() == rec["rubric"]


def test_write_pool_round_trip(pool_dir: Path):
    path = pool_dir / "out.jsonl"
    write_pool(path, [record("a", instruction="Quelle couleur ? ✓"), record("b")])
    text = path.read_text(encoding="utf-8")
    assert "✓" in text and len(text.splitlines()) == 2
    assert [r.instruction for r in load_pool(path)][0] == "Quelle couleur ? ✓"


def _mut(fn):
    def apply(rec):
        fn(rec)
        return rec

    return apply


def _set(path: str, value):
    def fn(rec):
        *head, last = path.split("/")
        obj = rec
        for k in head:
            obj = obj[int(k)] if k.isdigit() else obj[k]
        obj[int(last) if last.isdigit() else last] = value

    return _mut(fn)


def _del(path: str):
    def fn(rec):
        *head, last = path.split("/")
        obj = rec
        for k in head:
            obj = obj[int(k)] if k.isdigit() else obj[k]
        del obj[last]

    return _mut(fn)


# (name, raw line or mutation, field, message fragment)
BAD = [
    ("invalid_json", '{"id": "x",', "json", "invalid JSON"),
    ("not_object", "[1, 2]", "record", "must be a JSON object"),
    ("missing_id", _del("id"), "id", "missing"),
    ("empty_id", _set("id", "  "), "id", "non-empty string"),
    ("int_id", _set("id", 3), "id", "non-empty string"),
    ("missing_instruction", _del("instruction"), "instruction", "missing"),
    ("empty_instruction", _set("instruction", ""), "instruction", "non-empty string"),
    ("list_instruction", _set("instruction", ["a"]), "instruction", "non-empty string"),
    ("missing_images", _del("images"), "images", "missing"),
    ("empty_images", _set("images", []), "images", "non-empty list"),
    ("str_images", _set("images", "images/red.png"), "images", "non-empty list"),
    ("int_image", _set("images", ["images/red.png", 7]), "images[1]", "non-empty string"),
    ("missing_image_file", _set("images", ["images/nope.png"]), "images[0]", "not found"),
    ("unreadable_image", _set("images", ["images/broken.png"]), "images[0]", "unreadable image"),
    ("truncated_image", _set("images", ["images/truncated.png"]), "images[0]", "unreadable image"),
    ("missing_rubric", _del("rubric"), "rubric", "missing"),
    ("str_rubric", _set("rubric", "be good"), "rubric", "must be an object"),
    ("int_reference", _set("reference", 5), "reference", "must be a string"),
    ("no_essential", _del("rubric/essential"), "rubric.essential", "missing"),
    ("empty_essential", _set("rubric/essential", []), "rubric.essential", "is empty"),
    ("dict_additional", _set("rubric/additional", {}), "rubric.additional", "must be a list"),
    (
        "str_criterion",
        _set("rubric/additional/0", "A1"),
        "rubric.additional[0]",
        "must be an object",
    ),
    ("criterion_no_id", _del("rubric/essential/0/id"), "rubric.essential[0].id", "missing"),
    ("criterion_no_text", _del("rubric/additional/1/text"), "rubric.additional[1].text", "missing"),
    (
        "criterion_empty_text",
        _set("rubric/additional/1/text", ""),
        "rubric.additional[1].text",
        "non-empty string",
    ),
    (
        "dup_criterion",
        _set("rubric/additional/1/id", "E1"),
        "rubric.additional[1].id",
        "duplicate criterion id 'E1' (first at rubric.essential[0])",
    ),
    ("zero_weight", _set("rubric/additional/0/weight", 0), "rubric.additional[0].weight", "> 0"),
    ("neg_weight", _set("rubric/additional/0/weight", -1.5), "rubric.additional[0].weight", "> 0"),
    (
        "str_weight",
        _set("rubric/additional/0/weight", "1"),
        "rubric.additional[0].weight",
        "must be a number, got str",
    ),
    (
        "bool_weight",
        _set("rubric/additional/0/weight", True),
        "rubric.additional[0].weight",
        "must be a number, got bool",
    ),
    (
        "essential_weight",
        _set("rubric/essential/0/weight", 2.0),
        "rubric.essential[0].weight",
        "unweighted",
    ),
    ("record_unknown_key", _set("answer", "x"), "record", "unknown key(s) 'answer'"),
    ("rubric_unknown_key", _set("rubric/optional", []), "rubric", "unknown key(s) 'optional'"),
    (
        "criterion_unknown_key",
        _set("rubric/essential/0/score", 1),
        "rubric.essential[0]",
        "unknown key(s) 'score'",
    ),
    (
        "check_not_object",
        _set("rubric/essential/0/check", ["red"]),
        "rubric.essential[0].check",
        "must be an object",
    ),
    (
        "check_unknown_key",
        _set("rubric/essential/0/check", {"any": ["red"], "some": ["x"]}),
        "rubric.essential[0].check",
        "unknown key(s) 'some'",
    ),
    ("check_empty", _set("rubric/essential/0/check", {}), "rubric.essential[0].check", "is empty"),
    (
        "check_patterns_str",
        _set("rubric/essential/0/check", {"all": "red"}),
        "rubric.essential[0].check.all",
        "non-empty list",
    ),
    (
        "check_patterns_empty",
        _set("rubric/essential/0/check", {"none": []}),
        "rubric.essential[0].check.none",
        "non-empty list",
    ),
    (
        "check_pattern_int",
        _set("rubric/essential/0/check", {"any": ["red", 3]}),
        "rubric.essential[0].check.any[1]",
        "must be a string",
    ),
    (
        "check_bad_regex",
        _set("rubric/essential/0/check", {"any": ["red", "(unclosed"]}),
        "rubric.essential[0].check.any[1]",
        "missing ), unterminated subpattern",
    ),
]


@pytest.mark.parametrize("line, field, fragment", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_each_problem_is_located(pool_dir: Path, line, field, fragment):
    bad = line if isinstance(line, str) else line(record("bad"))
    pool = write_lines(pool_dir / "pool.jsonl", [record("ok1"), bad, record("ok2")])
    records, problems = check_pool(pool)
    assert [(p.file, p.line, p.field) for p in problems] == [(str(pool), 2, field)], problems
    assert fragment in problems[0].message
    assert [r.id for r in records] == ["ok1", "ok2"]  # the bad record is not returned
    with pytest.raises(PoolError) as err:
        load_pool(pool)
    assert err.value.problems == problems
    assert str(err.value) == f"{pool}:2: {field}: {problems[0].message}"


def test_duplicate_id_names_first_line(pool_dir: Path):
    pool = write_lines(pool_dir / "pool.jsonl", [record("a"), record("b"), "", record("a")])
    records, problems = check_pool(pool)
    assert [str(p) for p in problems] == [f"{pool}:4: id: duplicate id 'a' (first on line 1)"]
    assert [r.id for r in records] == ["a", "b"]


def test_no_images_skips_opening(pool_dir: Path):
    pool = write_lines(pool_dir / "pool.jsonl", [record(images=["images/nope.png"])])
    assert len(load_pool(pool, open_images=False)) == 1
    with pytest.raises(PoolError, match="not found"):
        load_pool(pool)


def test_missing_and_empty_pool_file(tmp_path: Path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(PoolError) as err:
        load_pool(missing)
    assert err.value.problems == [Problem(str(missing), 0, "file", "pool file not found")]
    empty = write_lines(tmp_path / "empty.jsonl", ["", ""])
    assert [p.field for p in check_pool(empty)[1]] == ["file"]


def test_all_problems_reported_at_once(pool_dir: Path):
    many = record("m", instruction="", reference=3)
    many["rubric"]["additional"][0]["weight"] = 0
    many["rubric"]["essential"][0]["check"] = {"any": ["("]}
    pool = write_lines(pool_dir / "pool.jsonl", [record("a"), "nope", many, record("a")])
    records, problems = check_pool(pool)
    assert sorted((p.line, p.field) for p in problems) == [
        (2, "json"),
        (3, "instruction"),
        (3, "reference"),
        (3, "rubric.additional[0].weight"),
        (3, "rubric.essential[0].check.any[0]"),
        (4, "id"),
    ]
    assert [r.id for r in records] == ["a"]
    with pytest.raises(PoolError) as err:
        load_pool(pool)
    assert len(str(err.value).splitlines()) == 6


def test_cli_validate_ok(pool_dir: Path, capsys):
    rec2 = record("b", images=["images/red.png", "images/gray.png"])
    rec2["rubric"]["additional"] = []
    pool = write_lines(pool_dir / "pool.jsonl", [record("a"), rec2])
    assert main(["validate", str(pool)]) == 0
    out, err = capsys.readouterr()
    assert (
        out == f"{pool}: 2 records, 3 images, 2 essential + 2 additional criteria (3 with checks)\n"
    )
    assert err == ""


def test_cli_validate_problems(pool_dir: Path, capsys):
    pool = write_lines(
        pool_dir / "pool.jsonl", [record("a", images=["images/nope.png"]), "{", record("a")]
    )
    assert main(["validate", str(pool)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith(f"{pool}:1: images[0]: file not found")
    assert lines[1].startswith(f"{pool}:2: json: invalid JSON")
    assert lines[2] == f"{pool}:3: id: duplicate id 'a' (first on line 1)"


def test_cli_no_images_and_missing_file(pool_dir: Path, capsys):
    pool = write_lines(pool_dir / "pool.jsonl", [record(images=["images/nope.png"])])
    assert main(["validate", "--no-images", str(pool)]) == 0
    assert "1 records, 1 images" in capsys.readouterr().out
    assert main(["validate", str(pool_dir / "missing.jsonl")]) == 1
    assert capsys.readouterr().err == f"{pool_dir / 'missing.jsonl'}:0: file: pool file not found\n"


def test_cli_requires_subcommand(capsys):
    with pytest.raises(SystemExit) as err:
        main([])
    assert err.value.code == 2
