"""The ground truth (rdpo.demo.truth): claims parsed from answers, checked against the scene."""

import json
import random
from types import SimpleNamespace

import pytest
from PIL import Image

from rdpo.demo import hardtoy, toy
from rdpo.demo.truth import GroundTruth, Question, check, parse_claims
from rdpo.judging.judges import RuleJudge
from rdpo.judging.scoring import score_response
from rdpo.pool import load_pool

EASY = SimpleNamespace(task="easy", n_train=40, n_heldout=20, task_seed=5)
HARD = SimpleNamespace(task="hard", n_train=40, n_heldout=20, task_seed=5)
# Two shapes: a red circle top left (col 0, row 0), a blue square bottom right, a green circle
# bottom middle.
SCENE = (("red", "circle", 0, 0), ("green", "circle", 1, 1), ("blue", "square", 2, 1))


def _records(cfg):
    draw = hardtoy.draw_records if cfg.task == "hard" else toy._draw_records
    ids = [f"train-{i:05d}" for i in range(cfg.n_train)]
    return [rec for rec, _, _ in draw(ids, cfg.task_seed)]


def test_parser_reads_the_task_vocabulary():
    assert parse_claims("There are 3 shapes: a Red circle, two blue squares and green.") == [
        ("number", 3, ("all",)), ("obj", "red", "circle"), ("number", 2, ("obj", "blue", "square")),
        ("obj", "blue", "square"), ("color", "green")]
    assert parse_claims("one green shape, 2") == [
        ("number", 1, ("color", "green")), ("group", "green"), ("number", 2, None)]
    assert parse_claims("The red shapes are left of and above it") == [
        ("group", "red"), ("rel", "left"), ("rel", "above")]


def test_partial_and_false_claims():
    rel = Question("relation", SCENE, (SCENE[0], SCENE[2]))
    assert check(rel, "The red circle is left of and above the blue square.").correct
    half = check(rel, "The red circle is left of and below the blue square.")
    # left (asked, true), below (false): recall 1/2; claims red circle, blue square, left true.
    assert (half.recall, half.precision, half.wrong, half.hallucination) == (0.5, 0.75, True, False)
    desc = Question("describe", SCENE)
    t = check(desc, "There are three shapes: a red circle, a yellow circle and a blue square.")
    assert (t.recall, t.hallucination, t.correct) == (pytest.approx(2 / 3), True, False)
    assert check(desc, "red circle, green circle, blue square").score == 1.0  # terse: facts only
    green = Question("count_color", SCENE, ("green",))
    assert check(green, "There is one green shape.").correct and check(green, "1").correct
    # One red shape is true, but the question asks about the blue ones (the regex rubric of
    # this prompt, looking for "one", would pass it).
    red = check(Question("count_color", SCENE, ("blue",)), "There is one red shape.")
    assert (red.recall, red.precision, red.correct) == (0.0, 1.0, False)
    assert check(Question("count", SCENE), "There are two red circles.").wrong  # one red circle


@pytest.mark.parametrize("cfg", [EASY, HARD], ids=["easy", "hard"])
def test_reference_and_flaws(cfg):
    """On every prompt: the reference is correct, a hallucination or a wrong fact is caught,
    terse and rambling answers keep their facts (the yardstick scores facts, not style)."""
    truth, flawed = GroundTruth.for_toy(cfg), (hardtoy if cfg.task == "hard" else toy).flawed_answers
    rng = random.Random(0)
    for rec in _records(cfg):
        ref = truth.check(rec["id"], rec["reference"])
        assert ref.correct and ref.score == 1.0, rec
        hallucinate, wrong, terse, ramble = (truth.check(rec["id"], a) for a in flawed(rec, rng))
        assert hallucinate.hallucination and not hallucinate.correct and hallucinate.score < 1
        assert not wrong.correct and wrong.score < 1
        assert terse.correct and ramble.correct


def test_yardstick_is_not_the_rubric(tmp_path):
    """Two shapes with their colours swapped ("a blue circle and a red square" for a red circle
    and a blue square): every essential criterion of the easy count prompt passes (the colours
    and shapes named are all there), the ground truth sees two shapes that are not."""
    rec = next(r for r in _records(EASY) if r["reference"] == "There are two shapes.")
    truth = GroundTruth.for_toy(EASY)
    (c1, s1, _, _), (c2, s2, _, _) = truth.questions[rec["id"]].objects
    answer = f"There are two shapes: a {c2} {s1} and a {c1} {s2}."
    record = _as_prompt_record(rec, tmp_path)
    assert score_response(record.rubric, RuleJudge().judge(record, [answer])[0]).essential_pass
    t = truth.check(rec["id"], answer)
    assert t.hallucination and not t.correct and t.precision == pytest.approx(1 / 3)


def _as_prompt_record(raw, d):
    """One raw record as a PromptRecord, through the pool loader's validation."""
    (d / "images").mkdir()
    Image.new("RGB", (8, 8)).save(d / raw["images"][0])
    (d / "p.jsonl").write_text(json.dumps(raw) + "\n")
    return load_pool(d / "p.jsonl")[0]


def test_truth_matches_the_pools_on_disk(tmp_path):
    for cfg, mod in ((EASY, toy), (HARD, hardtoy)):
        pools = mod.write_pools(tmp_path / cfg.task, n_train=cfg.n_train, n_heldout=cfg.n_heldout,
                                seed=cfg.task_seed, **({"n_warm": 10} if mod is hardtoy else {}))
        truth = GroundTruth.for_toy(cfg)
        truth.check_records(load_pool(pools.heldout))
        truth.check_records(load_pool(pools.train))
        other = GroundTruth.for_toy(SimpleNamespace(**{**vars(cfg), "task_seed": 6}))
        with pytest.raises(ValueError, match="not the toy draw of these toy settings"):
            other.check_records(load_pool(pools.heldout))
