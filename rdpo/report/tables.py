"""The report's Markdown tables of what rounds cost (cost.json), of the audit judge's watch
(judge_audit.json) and of per-criterion pass rates across rounds (the drift a policy learning
its judge's blind spots leaves: a criterion the training judge passes more and more often while
the audit judge does not)."""

from __future__ import annotations

from rdpo.report.rundir import RunData

DRIFT_ROUNDS = 6
"""Rounds shown in the drift table (evenly spaced, the first and the last among them)."""
TOP_DRIFT = 10


def _n(x) -> str:
    return "–" if x is None else f"{x:,}" if isinstance(x, int) else f"{x:.3f}"


def _money(m: dict) -> str:
    if m.get("total") is None:
        return "unknown"
    per = f" ({m['per_pair']:.4g} a pair)" if m.get("per_pair") is not None else ""
    return f"{m['total']:.4g}{per}"


def _seconds(s: dict) -> str:
    return " / ".join(f"{s.get(k, 0.0):.1f}" for k in ("sampling", "judging", "reference",
                                                         "audit", "training"))


def _cost_row(label: str, r: dict) -> str:
    return (f"| {label} | {_n(r['responses'])} | {_n(r['sampled_tokens'])} "
            f"| {_n(r['judge_requests'])} | {_n(r['judge_cache_hits'])} "
            f"| {_n(r['judge_prompt_tokens'])} / {_n(r['judge_completion_tokens'])} "
            f"| {_n(r['audit_requests'])} "
            f"| {_n(r['audit_prompt_tokens'])} / {_n(r['audit_completion_tokens'])} "
            f"| {_n(r['pairs_kept'])} | {_seconds(r['seconds'])} | {_money(r['money'])} |")


def cost_table(run: RunData) -> list[str]:
    """Per round and in total: what was sampled, asked and kept, the seconds of each phase and
    the money (cost.json); [] for a run without cost.json."""
    cost = run.cost
    if not cost.get("rounds"):
        return []
    out = ["", "What the rounds cost (cost.json; seconds are the slowest rank's, phases of a "
           "pipelined round overlap):", "",
           "| round | responses | sampled tokens | judge requests | cache hits "
           "| judge tokens in / out | audit requests | audit tokens in / out | pairs kept "
           "| seconds: sampling / judging / reference / audit / training | money |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    out += [_cost_row(str(r["round"]), r) for r in cost["rounds"]]
    out.append(_cost_row("**all**", cost["total"]))
    for key, what in (("outside_rounds", "Outside rounds (held-out evaluation)"),
                      ("redone", "Done again after a resume")):
        part = cost.get(key) or {}
        if any(part.get(k) for k in ("judge_requests", "audit_requests", "sampled_tokens")):
            out.append(f"\n{what}: {_n(part['judge_requests'])} judge requests, "
                       f"{_n(part['judge_prompt_tokens'])} / {_n(part['judge_completion_tokens'])}"
                       f" judge tokens, {_n(part['sampled_tokens'])} sampled tokens, money "
                       f"{_money(part['money'])}.")
    if cost["total"]["money"].get("total") is None:
        out.append("\nMoney unknown: set judge.price_input_per_mtok and "
                   "judge.price_output_per_mtok (and the audit judge's) to price the tokens.")
    return out


def audit_table(run: RunData) -> list[str]:
    """The audit judge's rows and warnings (judge_audit.json); [] without an audit judge."""
    audit = run.audit
    if not audit.get("rounds"):
        return []
    out = ["", f"Audit judge `{audit.get('judge')}` on {audit.get('fraction', 0):.0%} of each "
           "round's pairs (judge_audit.json):", "",
           "| round | pairs audited | pair agreement | verdict agreement | training margin "
           "| audit margin | training score | audit score |", "|---|---|---|---|---|---|---|---|"]
    for r in audit["rounds"]:
        out.append(f"| {r['round']} | {r['pairs']} | {_n(r['pair_agreement'])} "
                   f"| {_n(r['verdict_agreement'])} | {_n(r['train_margin'])} "
                   f"| {_n(r['audit_margin'])} | {_n(r['train_score'])} "
                   f"| {_n(r['audit_score'])} |")
    for w in audit.get("warnings", []):
        out.append(f"\n**Warning (round {w['round']})**: {w['message']}")
    return out


def _shown_rounds(indices: list[int]) -> list[int]:
    if len(indices) <= DRIFT_ROUNDS:
        return indices
    step = (len(indices) - 1) / (DRIFT_ROUNDS - 1)
    return sorted({indices[round(i * step)] for i in range(DRIFT_ROUNDS)})


def drift_table(run: RunData, min_judged: int = 10, top: int = TOP_DRIFT) -> list[str]:
    """Per criterion, the training judge's pass rate round by round (all responses; unknown
    verdicts left out) and the audit judge's, first to last audited round: the criteria whose
    rate moved most from the first round to the last. [] with fewer than two rounds."""
    rounds = {r.index: r.criteria for r in run.rounds}
    shown = _shown_rounds(sorted(rounds))
    if len(shown) < 2:
        return []
    first, last = rounds[shown[0]], rounds[shown[-1]]
    rows = []
    for label in first.keys() & last.keys():
        if first[label][1] < min_judged or last[label][1] < min_judged:
            continue
        rates = [rounds[i][label][0] / rounds[i][label][1] if rounds[i].get(label, (0, 0))[1]
                 else None for i in shown]
        rows.append((rates[-1] - rates[0], label, rates))
    if not rows:
        return []
    rows.sort(key=lambda r: (-abs(r[0]), r[1]))
    audited = sorted(run.audit_criteria)

    def audit_rate(label: str, index: int) -> str:
        met, judged = run.audit_criteria[index].get(label, (0, 0))
        return f"{met / judged:.0%}" if judged else "–"

    out = ["", "Criterion pass rates across rounds (training judge, all responses; audit judge "
           "on the audited responses, first → last audited round):", "",
           "| criterion | " + " | ".join(f"round {i}" for i in shown) + " | drift | audit |",
           "|---|" + "---|" * (len(shown) + 2)]
    for drift, label, rates in rows[:top]:
        audit = (f"{audit_rate(label, audited[0])} → {audit_rate(label, audited[-1])}"
                 if audited else "–")
        out.append(f"| {label.replace('|', chr(92) + '|')} | "
                   + " | ".join("–" if r is None else f"{r:.0%}" for r in rates)
                   + f" | {100 * drift:+.0f} pts | {audit} |")
    return out


__all__ = ["audit_table", "cost_table", "drift_table"]
