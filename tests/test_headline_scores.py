"""The README's score table, asserted: the demo on the small preset meets every goal (slow), and a
reduced preset (one tilt series of 21 tilts, the same field) meets them with a margin in CI."""

from __future__ import annotations

import json

import pytest

from tomopipe.cli import main
from tomopipe.validate.scores import GOALS, STEP_GOALS, Goal, goal_of


def _demo_scores(out, preset: str, seed: int) -> list[dict]:
    assert main(["demo", "--out", str(out), "--preset", preset, "--seed", str(seed), "--jobs", "2"]) == 0
    return json.loads((out / "scores.json").read_text(encoding="utf-8"))


#: Goals the reduced preset is not held to, with the reason (measured; the small preset meets them, `slow`).
REDUCED_EXEMPT = {
    # one tilt series of 21 tilts, ~130 particles: the refined map's gold standard at bin 2 reads 5.98 Å and
    # the FSC against the truth 7.4 Å (0.19); on the small preset they agree within 0.012
    ("refine_bin2", "gold_truth_disagreement"),
}


def _unmet(records: list[dict], slack: float, exempt: set = frozenset()) -> list[str]:
    """Every goal must be scored (a step that scored nothing fails) and met within ``slack``, but those
    ``exempt`` (step, score)."""
    records = [r for r in records if (r["step"], r["score"]) not in exempt]
    statuses = {r["step"]: r["value"] for r in records if r["score"] == "status"}
    problems = [f"{step}: {status}" for step, status in statuses.items()
                if status not in ("finished", "skipped", "simulated", "reused")]
    scored = {r["score"] for r in records}
    problems += [f"{name}: not scored" for name in GOALS if name not in scored]
    problems += [f"{step} {name}: not scored" for step, name in STEP_GOALS if (step, name) not in exempt
                 and not any(r["step"] == step and r["score"] == name for r in records)]
    problems += [f"{r['step']} {r['subject']} {r['score']} = {r['value']} (goal {r['goal']}, slack {slack:.0%})"
                 for r in records if (goal := goal_of(r["step"], r["score"])) and not goal.met(r["value"], slack)]
    return problems


def test_goal_slack_loosens_numbers_only():
    assert Goal("at most", 0.3).met(0.4, slack=0.5) and not Goal("at most", 0.3).met(0.4)
    assert Goal("at least", 0.4).met(0.3, slack=0.5) and not Goal("at least", 0.4).met(0.19, slack=0.5)
    assert not Goal("equal to", "as the truth").met("opposite", slack=0.5)
    assert not Goal("at most", 1.0).met(float("nan"), slack=10.0)


def test_reduced_preset_meets_the_goals_with_a_margin(tmp_path):
    problems = _unmet(_demo_scores(tmp_path / "demo", "reduced", seed=2), slack=0.5, exempt=REDUCED_EXEMPT)
    assert not problems, "\n".join(problems)


@pytest.mark.slow
def test_small_preset_meets_every_goal_of_the_readme(tmp_path):
    problems = _unmet(_demo_scores(tmp_path / "demo", "small", seed=4), slack=0.0)
    assert not problems, "\n".join(problems)
