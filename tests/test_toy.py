import json
import random
import re

import pytest
from PIL import Image

from rdpo.demo import toy
from rdpo.demo.toy import COLORS, SHAPES, Scene

WHITE = (255, 255, 255)
LEFT_CENTRE, RIGHT_CENTRE = (28, 28), (84, 28)
SPEC_RGB = {"red": (220, 30, 30), "green": (30, 170, 30), "blue": (30, 60, 220),
            "yellow": (230, 200, 20)}


def met(check: dict, text: str) -> bool:
    """RuleJudge semantics, inline: keys ANDed, re.search, case-insensitive."""
    hits = {k: [re.search(p, text, re.IGNORECASE) is not None for p in pats]
            for k, pats in check.items()}
    return (all(any(h) for k, h in hits.items() if k == "any")
            and all(all(h) for k, h in hits.items() if k == "all")
            and not any(any(h) for k, h in hits.items() if k == "none"))


def failed(record: dict, text: str) -> tuple[list[str], list[str]]:
    r = record["rubric"]
    return ([c["id"] for c in r["essential"] if not met(c["check"], text)],
            [c["id"] for c in r["additional"] if not met(c["check"], text)])


def score(record: dict, text: str) -> float:
    """DESIGN.md default score."""
    r = record["rubric"]
    e = sum(met(c["check"], text) for c in r["essential"]) / len(r["essential"])
    a = (sum(c["weight"] for c in r["additional"] if met(c["check"], text))
         / sum(c["weight"] for c in r["additional"]))
    return e / 2 if e < 1 else 0.5 + a / 2


def kind_of(record: dict) -> str:
    prefixes = {"What color": "color", "How many": "count", "Where is": "position",
                "Describe": "describe"}
    return next(k for p, k in prefixes.items() if record["instruction"].startswith(p))


def all_scenes() -> list[Scene]:
    objs = [(c, s) for c in COLORS for s in SHAPES]
    return ([Scene(o, None) for o in objs] + [Scene(None, o) for o in objs]
            + [Scene(a, b) for a in objs for b in objs if a[0] != b[0] and a[1] != b[1]])


def read_pool(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def scene_on_disk(pool_path, record) -> Scene:
    with Image.open(pool_path.parent / record["images"][0]) as img:
        return toy.scene_from_image(img)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    # The task has exactly 528 distinct (scene, instruction) pairs; drawing all covers every case.
    out = tmp_path_factory.mktemp("full")
    pools = toy.write_pools(out, n_train=528, n_heldout=0, seed=3)
    return [(r, scene_on_disk(pools.train, r)) for r in read_pool(pools.train)]


@pytest.fixture(scope="module")
def all_records(full):
    return [r for r, _ in full]


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    return out, toy.write_pools(out, n_train=40, n_heldout=20, seed=5)


def test_render_size_and_determinism():
    scene = Scene(("red", "circle"), ("blue", "triangle"))
    a, b = toy.render(scene, 7), toy.render(scene, 7)
    assert a.size == (112, 56) and a.mode == "RGB"
    assert a.tobytes() == b.tobytes()
    assert any(toy.render(scene, s).tobytes() != a.tobytes() for s in range(1, 6))  # jitter


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("color", COLORS)
def test_render_pixel_colours(color, shape):
    for seed in range(10):
        img = toy.render(Scene((color, shape), None), seed)
        assert img.getpixel(LEFT_CENTRE) == SPEC_RGB[color]
        assert img.getpixel(RIGHT_CENTRE) == WHITE
        assert img.getpixel((0, 0)) == WHITE and img.getpixel((111, 55)) == WHITE
        assert {c for _, c in img.getcolors()} == {WHITE, SPEC_RGB[color]}  # no anti-aliasing blends
        img = toy.render(Scene(None, (color, shape)), seed)
        assert img.getpixel(RIGHT_CENTRE) == SPEC_RGB[color]
        assert img.getpixel(LEFT_CENTRE) == WHITE


def test_render_shapes_differ_and_triangle_points_up():
    imgs = {s: toy.render(Scene(("red", s), None), 0) for s in SHAPES}
    areas = {s: sum(n for n, c in im.getcolors() if c != WHITE) for s, im in imgs.items()}
    assert areas["triangle"] < areas["circle"] < areas["square"]
    tri = imgs["triangle"]
    rows = [sum(tri.getpixel((x, y)) != WHITE for x in range(56)) for y in range(56)]
    filled = [r for r in rows if r]
    assert filled[0] < filled[-1] and filled[-1] >= 34  # narrow top, wide base


def test_write_pools_deterministic_and_idempotent(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    toy.write_pools(a, n_train=12, n_heldout=6, seed=1)
    toy.write_pools(b, n_train=12, n_heldout=6, seed=1)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    # three pools + one image per (scene, instruction) pair of the whole task
    assert len(files) == 3 + toy.TOTAL_PAIRS
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    mtimes = {f: (a / f).stat().st_mtime_ns for f in files}
    toy.write_pools(a, n_train=12, n_heldout=6, seed=1)
    assert mtimes == {f: (a / f).stat().st_mtime_ns for f in files}  # not rewritten
    c = tmp_path / "c"
    toy.write_pools(c, n_train=12, n_heldout=6, seed=2)
    assert (c / "train.jsonl").read_bytes() != (a / "train.jsonl").read_bytes()


def test_pools_disjoint_with_images(pools):
    out, paths = pools
    assert paths.train == out / "train.jsonl" and paths.heldout == out / "heldout.jsonl"
    train, held = read_pool(paths.train), read_pool(paths.heldout)
    assert [r["id"] for r in train] == [f"train-{i:05d}" for i in range(40)]
    assert [r["id"] for r in held] == [f"heldout-{i:05d}" for i in range(20)]
    assert all(r["images"] == [f"images/{r['id']}.png"] for r in train + held)
    warm = read_pool(paths.warmstart)
    warm_ids = {r["id"] for r in warm}
    # the warm start sees the train prompts and every other non-held-out pair, never held-out
    assert {r["id"] for r in train} <= warm_ids and not warm_ids & {r["id"] for r in held}
    assert len(warm) == toy.TOTAL_PAIRS - len(held)
    def key(r):
        with Image.open(out / r["images"][0]) as im:
            return r["instruction"], toy.scene_from_image(im.convert("RGB"))

    assert not {key(r) for r in warm} & {key(r) for r in held}
    train_keys = {(scene_on_disk(paths.train, r), r["instruction"]) for r in train}
    held_keys = {(scene_on_disk(paths.heldout, r), r["instruction"]) for r in held}
    assert len(train_keys) == 40 and len(held_keys) == 20
    assert not train_keys & held_keys


def test_records_hold_only_pool_keys(pools):
    _, paths = pools
    for r in read_pool(paths.train) + read_pool(paths.heldout):
        assert set(r) == {"id", "images", "instruction", "reference", "rubric", "outcome"}
        assert set(r["rubric"]) == {"essential", "additional"}
        for c in r["rubric"]["essential"] + r["rubric"]["additional"]:
            assert set(c) <= {"id", "text", "weight", "check"}
            assert set(c["check"]) <= {"any", "all", "none"}
            assert all(re.compile(p) for v in c["check"].values() for p in v)


def test_scene_from_image_round_trips():
    for i, scene in enumerate(all_scenes()):
        for seed in (i, i + 1000):
            assert toy.scene_from_image(toy.render(scene, seed)) == scene


def test_too_many_records_is_an_error():
    with pytest.raises(ValueError, match="528"):
        toy.make_records(529, seed=0, id_prefix="x")


def test_scenes_are_valid_and_kinds_balanced(full):
    assert len({(scene, r["instruction"]) for r, scene in full}) == 528
    assert {scene for _, scene in full} == set(all_scenes())
    kinds = [kind_of(r) for r in toy.make_records(400, seed=0, id_prefix="k")]
    assert all(60 <= kinds.count(k) <= 140 for k in toy.KINDS)


def test_rubric_format(all_records):
    ids = [r["id"] for r in all_records]
    assert len(set(ids)) == len(ids)
    for r in all_records:
        ess, add = r["rubric"]["essential"], r["rubric"]["additional"]
        assert ess and add
        assert [c["id"] for c in ess] == [f"E{i}" for i in range(1, len(ess) + 1)]
        assert [c["id"] for c in add] == [f"A{i}" for i in range(1, len(add) + 1)]
        assert all(c["text"].endswith(".") and c["check"] for c in ess + add)
        assert all(0.5 <= c["weight"] <= 1.0 for c in add)
        assert all("weight" not in c for c in ess)
        assert any(c["text"] == "Does not name a colour that is absent from the image."
                   for c in ess)


def test_reference_meets_every_criterion(all_records):
    for r in all_records:
        assert failed(r, r["reference"]) == ([], []), (r["instruction"], r["reference"])
        assert score(r, r["reference"]) == 1.0


def test_reference_answers_match_the_image(full):
    by_instruction = {}
    for r, scene in full:
        kind, ref, items = kind_of(r), r["reference"], scene.items()
        by_instruction.setdefault(kind, set()).add(r["instruction"])
        if kind == "count":
            assert ref == ("There is one shape." if len(items) == 1 else "There are two shapes.")
        elif kind == "describe":
            parts = [f"a {c} {s} on the {side}" for side, (c, s) in items]
            assert ref == "There is " + " and ".join(parts) + "."
        else:
            matches = [(side, c, s) for side, (c, s) in items
                       if r["instruction"] in (f"What color is the {s}?", f"Where is the {c} {s}?")]
            assert len(matches) == 1, r["instruction"]
            side, c, s = matches[0]
            assert ref == (f"The {s} is {c}." if kind == "color" else f"The {c} {s} is on the {side}.")
    assert by_instruction["count"] == {"How many shapes are there?"}
    assert by_instruction["describe"] == {"Describe the image."}
    assert len(by_instruction["color"]) == 3 and len(by_instruction["position"]) == 12


def test_flawed_answers_fail_the_right_criteria(all_records):
    for i, r in enumerate(all_records):
        for seed in range(3):
            answers = toy.flawed_answers(r, random.Random(i * 10 + seed))
            assert len(answers) == len(toy.FLAW_KINDS)
            for kind, text in zip(toy.FLAW_KINDS, answers, strict=True):
                ess, add = failed(r, text)
                where = (r["instruction"], r["reference"], kind, text)
                assert text != r["reference"], where
                if kind in ("hallucinate", "wrong"):
                    assert ess, where
                    assert score(r, text) < 0.5
                else:
                    assert not ess and add, where
                    assert 0.5 <= score(r, text) < 1.0


def test_flawed_answers_shapes(all_records):
    r = next(x for x in all_records if kind_of(x) == "color")
    hallucinate, wrong, terse, ramble = toy.flawed_answers(r, random.Random(0))
    assert hallucinate.startswith(r["reference"] + " There is also a ")
    assert ramble.startswith(r["reference"] + " ")
    assert wrong.startswith("The ") and wrong != r["reference"]
    assert terse.lower() + "." == r["reference"].split()[-1]


def test_word_salad_cannot_score_well(all_records):
    salad = " ".join(COLORS + SHAPES) + " left right one two shapes."
    assert all(score(r, salad) < 0.5 for r in all_records)


def test_describe_side_check_rejects_swapped_sides(full):
    r, scene = next((x, sc) for x, sc in full if kind_of(x) == "describe" and len(sc.items()) == 2)
    (c1, s1), (c2, s2) = scene.left, scene.right
    swapped = f"There is a {c1} {s1} on the right and a {c2} {s2} on the left."
    ess, add = failed(r, swapped)
    assert not ess and len(add) == 2


def test_sft_targets(all_records):
    records = all_records[:300]
    targets = toy.sft_targets(records, flaw_rate=0.3, seed=4)
    assert len(targets) == 4 * len(records)
    assert [t[0]["id"] for t in targets] == [r["id"] for r in records for _ in range(4)]
    assert targets == toy.sft_targets(records, flaw_rate=0.3, seed=4)
    assert targets != toy.sft_targets(records, flaw_rate=0.3, seed=5)
    flawed = [(r, a) for r, a in targets if a != r["reference"]]
    assert abs(len(flawed) / len(targets) - 0.3) < 0.04
    assert all(score(r, a) < 1.0 for r, a in flawed)
    assert sum(score(r, a) < 0.5 for r, a in flawed) > 0.3 * len(flawed)  # all kinds appear
    assert len(toy.sft_targets(records[:5], flaw_rate=0.0, seed=0, copies=2)) == 10
    assert all(a == r["reference"] for r, a in toy.sft_targets(records, flaw_rate=0.0, seed=0))
    assert all(a != r["reference"] for r, a in toy.sft_targets(records, flaw_rate=1.0, seed=0))


def test_corpus_covers_task(all_records):
    texts = toy.corpus()
    assert texts == sorted(set(texts))
    words = {w for t in texts for w in re.findall(r"\w+", t.lower())}
    vocab = set(texts)
    rng = random.Random(0)
    for r in all_records:
        assert r["instruction"] in vocab and r["reference"] in vocab
        for t in toy.flawed_answers(r, rng) + [c["text"] for p in r["rubric"].values() for c in p]:
            assert set(re.findall(r"\w+", t.lower())) <= words, t
