"""The claims table (`mixrobust.study.claims`) against hand-built results whose verdict is obvious by construction."""

from __future__ import annotations

import math

import pytest

from mixrobust.evaluation.outcomes import COLUMNS
from mixrobust.study.claims import Claim, check_claims, claims_table, pct

NAN = math.nan


def row(model: str, attack: str, accuracy: float | None, alpha: float = NAN, option: str = "one/prob",
        n: int = 100, steps: int | None = 20) -> dict:
    """A results row as `read_results_csv` returns it (base models: no alpha, no mixing option)."""
    r_option, mix_space = option.split("/") if model == "mix" else (None, None)
    out = {"model": model, "alpha": alpha, "r_option": r_option, "mix_space": mix_space,
           "h_map": "identity" if model == "mix" else None, "norm": "inf",
           "eps": 8 / 255, "attack": attack, "implementation": "mixrobust", "steps": 0 if attack == "clean" else steps,
           "accuracy": accuracy, "n": n, "g_model": None, "h_model": None}
    assert tuple(out) == COLUMNS
    return out


def fig2(clean: dict, mix: dict | None = None, worst: dict | None = None, g: float = 0.95, h: float = 0.83,
         rob: float = 0.45, h_worst: float | None = None) -> list[dict]:
    """Figure 2 rows: g and h (clean, own PGD, worst case if given), then the mixture's clean / mix / worst accuracy
    per alpha."""
    rows = [row("g", "clean", g), row("g", "std", 0.0), row("h", "clean", h), row("h", "rob", rob)]
    rows += [row("h", "worst", h_worst)] if h_worst is not None else []
    for attack, curve in (("clean", clean), ("mix", mix or {}), ("worst", worst or {})):
        rows += [row("mix", attack, acc, alpha) for alpha, acc in curve.items()]
    return rows


def by_key(claims: list[Claim]) -> dict[str, Claim]:
    return {c.key: c for c in claims}


def test_pct():
    assert pct(0.835) == "83.5%"
    assert pct(1.0) == "100.0%"
    assert pct(None) == "n/a" and pct(NAN) == "n/a"


def test_nothing_ran_is_all_inconclusive():
    claims = check_claims()
    assert [c.key for c in claims] == ["clean_moves", "mix_jump", "r_one_prob_best", "margin_asymmetry",
                                       "certified_small_radii", "attack_strength"]
    assert all(c.verdict == "inconclusive" and "did not run" in c.reason for c in claims)
    assert [c.figure for c in claims] == ["Figure 2", "Figure 2", "Figure 1", "Table 1", "Figure 3", "Evaluation"]


# --- clean_moves ---------------------------------------------------------------------------------

CLEAN = {0.0: 0.95, 0.25: 0.94, 0.5: 0.945, 0.6: 0.92, 0.75: 0.90, 1.0: 0.83}  # one rise of 0.5 points: noise


def test_clean_moves_holds():
    claim = by_key(check_claims(fig2(CLEAN)))["clean_moves"]
    assert claim.verdict == "holds"
    assert claim.numbers == "g 95.0%, h 83.0%, alpha=0 95.0%, alpha=0.6 92.0%, alpha=1 83.0%"
    assert "1.0 points" in claim.reason


def test_clean_moves_a_little_above_both_ends_still_holds():
    """An ensemble may beat both models by less than the tolerance (a rise along alpha is not a failure)."""
    claim = by_key(check_claims(fig2({**CLEAN, 0.25: 0.955})))["clean_moves"]  # g 95%, alpha 0.25 95.5%
    assert claim.verdict == "holds"


def test_clean_moves_leaving_the_range_does_not_hold():
    claim = by_key(check_claims(fig2({**CLEAN, 0.5: 0.97})))["clean_moves"]  # 2 points above g's 95% at alpha 0.5
    assert claim.verdict == "does not hold"
    assert "at alpha=0.5 clean accuracy 97.0% leaves the range between g's and h's by 2.0 points" in claim.reason
    low = by_key(check_claims(fig2({**CLEAN, 0.75: 0.80})))["clean_moves"]  # 3 points below h's 83%
    assert low.verdict == "does not hold" and "by 3.0 points" in low.reason


def test_clean_moves_wrong_end_does_not_hold():
    claim = by_key(check_claims(fig2({**CLEAN, 0.0: 0.90})))["clean_moves"]  # g is 95%, alpha 0 gives 90%
    assert claim.verdict == "does not hold"
    assert "alpha=0 differs from g by 5.0 points" in claim.reason


def test_clean_moves_without_alpha_one_is_inconclusive():
    claim = by_key(check_claims(fig2({a: v for a, v in CLEAN.items() if a < 1})))["clean_moves"]
    assert claim.verdict == "inconclusive" and "alpha=1" in claim.reason


# --- mix_jump ------------------------------------------------------------------------------------

MIX = {0.0: 0.0, 0.25: 0.0, 0.4: 0.01, 0.6: 0.38, 0.75: 0.40, 1.0: 0.44}
WORST = {0.0: 0.0, 0.25: 0.0, 0.4: 0.01, 0.6: 0.36, 0.75: 0.39, 1.0: 0.43}


def test_mix_jump_holds():
    # jump 0.37 >= 0.5 * 0.45; min over alpha >= 0.6 is 0.38 >= 0.75 * 0.45 = 0.3375
    claim = by_key(check_claims(fig2(CLEAN, MIX, WORST)))["mix_jump"]
    assert claim.verdict == "holds"
    for part in ("MIX alpha=0.4 1.0%", "MIX alpha=0.6 38.0%", "min over alpha>=0.6 38.0%", "h own PGD 45.0%",
                 "alpha=0.6: MIX 38.0%, worst 36.0%"):
        assert part in claim.numbers
    assert "0.5" in claim.reason and "0.75" in claim.reason


def test_mix_jump_without_jump_does_not_hold():
    claim = by_key(check_claims(fig2(CLEAN, {**MIX, 0.6: 0.05}, WORST)))["mix_jump"]  # jump 4 points
    assert claim.verdict == "does not hold" and "jump across 1/2 (4.0 points)" in claim.reason


def test_mix_jump_falling_back_does_not_hold():
    claim = by_key(check_claims(fig2(CLEAN, {**MIX, 0.75: 0.20}, WORST)))["mix_jump"]  # 20% < 33.75%
    assert claim.verdict == "does not hold" and "falls to 20.0%" in claim.reason


def test_mix_jump_from_well_above_zero_does_not_hold():
    # jump 0.25 >= 0.225 and the rest holds, but 15% at alpha 0.4 is not near 0 (> 0.25 * 45%)
    claim = by_key(check_claims(fig2(CLEAN, {**MIX, 0.4: 0.15, 0.6: 0.40}, WORST)))["mix_jump"]
    assert claim.verdict == "does not hold" and "MIX at alpha=0.4 is 15.0%, not near 0" in claim.reason


def test_mix_jump_judges_the_worst_cases_too():
    # under the paper's PGD it holds (38% >= 0.75 * 45%); the mixture's worst case keeps 30% of h's worst 44%:
    # 30% < 0.75 * 44% = 33%
    rows = fig2(CLEAN, MIX, {**WORST, 0.6: 0.30}, h_worst=0.44)
    claim = by_key(check_claims(rows))["mix_jump"]
    assert claim.verdict == "does not hold" and "under the paper's PGD only" in claim.reason
    assert "worst case: min over alpha>=0.6 30.0%, h 44.0%" in claim.numbers
    holds = by_key(check_claims(fig2(CLEAN, MIX, WORST, h_worst=0.44)))["mix_jump"]  # 36% >= 33%
    assert holds.verdict == "holds" and "the worst cases too" in holds.reason


def test_mix_jump_without_robust_h_is_inconclusive():
    claim = by_key(check_claims(fig2(CLEAN, MIX, WORST, rob=0.02)))["mix_jump"]
    assert claim.verdict == "inconclusive" and "5.0%" in claim.reason


def test_mix_jump_without_alphas_below_half_is_inconclusive():
    claim = by_key(check_claims(fig2(CLEAN, {0.5: 0.2, 0.6: 0.38, 1.0: 0.44})))["mix_jump"]
    assert claim.verdict == "inconclusive" and "below 1/2" in claim.reason


# --- r_one_prob_best -----------------------------------------------------------------------------

def fig1(curves: dict[str, list[tuple[float, float, float]]], n: int = 10_000) -> list[dict]:
    """Figure 1 rows: per option, (alpha, clean, worst) points, on `n` images (many: differences are not noise)."""
    return [row("mix", attack, acc, alpha, option, n=n) for option, points in curves.items()
            for alpha, clean, worst in points for attack, acc in (("clean", clean), ("worst", worst))]


BETTER = [(0.0, 0.95, 0.0), (0.5, 0.90, 0.30), (1.0, 0.80, 0.45)]
WORSE = [(0.0, 0.95, 0.0), (0.5, 0.90, 0.20), (1.0, 0.80, 0.45)]
# levels 0.80, 0.815, ..., 0.95: differences 0, 1.5, ..., 9 points up to 0.89, then 9, 6, 3, 0: mean 4.5 points


def test_r_one_prob_best_holds():
    claim = by_key(check_claims(fig1_rows=fig1({"one/prob": BETTER, "one/logit": WORSE})))["r_one_prob_best"]
    assert claim.verdict == "holds"
    assert "one/logit +4.5 pts +/- 1." in claim.numbers and "(clean 80.0%-95.0%)" in claim.numbers


def test_r_one_prob_best_tying_one_option_is_inconclusive():
    """It must beat every option: beating one and tying another leaves the claim open, naming the tie."""
    claims = by_key(check_claims(fig1_rows=fig1({"one/prob": BETTER, "one/logit": WORSE, "grad_g_i/prob": BETTER})))
    claim = claims["r_one_prob_best"]
    assert claim.verdict == "inconclusive" and "ties grad_g_i/prob" in claim.reason


def test_r_one_prob_best_does_not_hold():
    claims = by_key(check_claims(fig1_rows=fig1({"one/prob": WORSE, "one/logit": WORSE, "grad_g_i/prob": BETTER})))
    claim = claims["r_one_prob_best"]
    assert claim.verdict == "does not hold"
    assert "grad_g_i/prob -4.5 pts" in claim.numbers and "one/logit +0.0 pts" in claim.numbers
    assert "grad_g_i/prob beats one/prob" in claim.reason


def test_r_one_prob_best_without_overlap_is_inconclusive():
    other = [(0.0, 0.99, 0.0), (1.0, 0.96, 0.10)]  # clean 96-99% vs one/prob's 80-95%
    claim = by_key(check_claims(fig1_rows=fig1({"one/prob": BETTER, "one/logit": other})))["r_one_prob_best"]
    assert claim.verdict == "inconclusive" and "narrower than 1.0 points" in claim.reason


def test_r_one_prob_best_with_equally_clean_curves_compares_their_best_attacked_accuracy():
    flat_best = [(0.0, 0.990, 0.0), (0.5, 0.992, 0.40), (0.8, 0.988, 0.70)]  # clean 98.8-99.2%: within 1 point
    flat_worse = [(0.0, 0.990, 0.0), (0.5, 0.991, 0.10), (0.8, 0.989, 0.50)]
    claim = by_key(check_claims(fig1_rows=fig1({"one/prob": flat_best, "one/logit": flat_worse})))["r_one_prob_best"]
    assert claim.verdict == "holds"
    assert "one/logit +20.0 pts +/- 1.4 (best attacked accuracy; all clean 98.8%-99.2%" in claim.numbers
    reverse = by_key(check_claims(fig1_rows=fig1({"one/prob": flat_worse, "one/logit": flat_best})))
    assert reverse["r_one_prob_best"].verdict == "does not hold"


def test_r_one_prob_best_on_few_images_needs_more_than_noise():
    """4.5 points on 100 images is within two standard errors (about 12 points here): a tie, not a verdict."""
    claim = by_key(check_claims(fig1_rows=fig1({"one/prob": BETTER, "one/logit": WORSE}, n=100)))["r_one_prob_best"]
    assert claim.verdict == "inconclusive" and "two standard errors" in claim.reason
    assert "one/prob minus (n=100): one/logit +4.5 pts +/- 12." in claim.numbers


def test_r_one_prob_best_alone_is_inconclusive():
    claim = by_key(check_claims(fig1_rows=fig1({"one/prob": BETTER})))["r_one_prob_best"]
    assert claim.verdict == "inconclusive"


def test_r_one_prob_best_uses_the_upper_envelope():
    # one/prob dips at clean 90% (5%) below a cleaner point (92%, 10%); its envelope is the other curve exactly.
    # Read point by point it would lose by 1.8 points on average ("does not hold"); with the envelope it ties.
    dipping = [(0.0, 0.95, 0.0), (0.25, 0.92, 0.10), (0.5, 0.90, 0.05), (1.0, 0.80, 0.45)]
    envelope = [(0.0, 0.95, 0.0), (0.25, 0.92, 0.10), (0.5, 0.90, 0.10), (1.0, 0.80, 0.45)]
    claim = by_key(check_claims(fig1_rows=fig1({"one/prob": dipping, "one/logit": envelope})))["r_one_prob_best"]
    assert claim.verdict == "inconclusive" and "ties" in claim.reason
    assert "one/logit +0.0 pts" in claim.numbers


# --- margin_asymmetry ----------------------------------------------------------------------------

def margins(g=(0.982, 0.698, 0.602, 0.998), h=(0.854, 0.434, 0.768, 0.635), n=(100, 100, 100, 100)) -> dict:
    """margins.json: (clean correct, clean incorrect, attacked correct, attacked incorrect) mean gaps."""
    def model(means, attack):
        cells = [{"mean": m, "median": m, "n": k} for m, k in zip(means, n)]
        return {"clean": {"correct": cells[0], "incorrect": cells[1]},
                "attacked": {"correct": cells[2], "incorrect": cells[3]}, "attack": attack}
    return {"g": model(g, "std"), "h": model(h, "rob"), "mix": []}


def test_margin_asymmetry_holds_on_the_papers_numbers():
    claim = by_key(check_claims(margins=margins()))["margin_asymmetry"]
    assert claim.verdict == "holds"
    assert ("g: clean 0.982 (n=100) / 0.698 (n=100), attacked 0.602 (n=100) / 0.998 (n=100); "
            "h: clean 0.854 (n=100) / 0.434 (n=100), attacked 0.768 (n=100) / 0.635 (n=100)") in claim.numbers
    assert "0.02" in claim.reason


def test_margin_asymmetry_reversed_does_not_hold():
    claim = by_key(check_claims(margins=margins(h=(0.854, 0.434, 0.5, 0.635))))["margin_asymmetry"]
    assert claim.verdict == "does not hold" and "h attacked correct > incorrect" in claim.reason


def test_margin_asymmetry_g_unsure_on_mistakes_does_not_hold():
    claim = by_key(check_claims(margins=margins(g=(0.982, 0.698, 0.602, 0.4))))["margin_asymmetry"]
    assert claim.verdict == "does not hold" and "g attacked incorrect > h's" in claim.reason


def test_margin_asymmetry_small_cell_is_inconclusive():
    claim = by_key(check_claims(margins=margins(n=(100, 100, 100, 3))))["margin_asymmetry"]
    assert claim.verdict == "inconclusive" and "fewer than 10" in claim.reason


def test_margin_asymmetry_empty_cell_is_inconclusive():
    claim = by_key(check_claims(margins=margins(h=(0.854, 0.434, 0.768, None), n=(100, 100, 100, 0))))[
        "margin_asymmetry"]
    assert claim.verdict == "inconclusive" and "n/a (n=0)" in claim.numbers


# --- certified_small_radii -----------------------------------------------------------------------

RADII = (0.0, 0.125, 0.25, 0.5, 1.0)


def summary(mix: dict, base: dict | None, alpha: float | None = 0.7, clean: float = 0.80, base_clean: float = 0.80,
            sigma: float = 0.5, radii=RADII, reason: str | None = None, n: int = 10_000) -> dict:
    """A certify_summary.json with Theorem 5 accuracies `mix` and the baseline's `base` (radius -> accuracy) on `n`
    images (many: a 5-point difference is not noise)."""
    name = repr(float(alpha)) if alpha is not None else "0.5"
    table = {"mix": {name: {**{f"cert/rs_acc@{r:g}": a for r, a in mix.items()},
                            **{f"cert/lipschitz_acc@{r:g}": 0.0 for r in mix}}}}
    if base is not None:
        table["baseline"] = {f"cert/baseline_acc@{r:g}": a for r, a in base.items()}
    return {"sigma": sigma, "baseline_sigma": 0.25 if base is not None else None, "n_examples": n,
            "clean_accuracy": {"g": 0.95, "h": 0.70, "mix": {name: clean},
                               "baseline": base_clean if base is not None else None},
            "alpha_selection": {"alpha": alpha, "target": base_clean, "method": "at_least", "reason": reason},
            "certified_accuracy": table, "settings": {"report_radii": list(radii)}}


MIX_CERT = {0.0: 0.80, 0.125: 0.70, 0.25: 0.60, 0.5: 0.10, 1.0: 0.0}  # far worse at r = 0.5, not a small radius
BASE_CERT = {0.0: 0.80, 0.125: 0.65, 0.25: 0.55, 0.5: 0.40, 1.0: 0.10}


def certified(summaries: dict) -> list[Claim]:
    return [c for c in check_claims(certify=summaries) if c.key.startswith("certified_small_radii")]


def test_certified_small_radii_holds_one_row_per_mode():
    rows = certified({"sound": summary(MIX_CERT, BASE_CERT), "plugin": summary(MIX_CERT, BASE_CERT)})
    assert [(c.key, c.figure) for c in rows] == [("certified_small_radii_plugin", "Figure 3 (plug-in)"),
                                                 ("certified_small_radii_sound", "Figure 3 (sound)")]
    assert all(c.verdict == "holds" for c in rows)
    assert rows[0].numbers == ("alpha=0.7: clean 80.0% vs baseline 80.0%; r=0.125: 70.0% vs 65.0%; "
                               "r=0.25: 60.0% vs 55.0%")
    assert "sigma/2 = 0.25" in rows[0].reason


def test_certified_small_radii_below_baseline_does_not_hold():
    [claim] = certified({"sound": summary({**MIX_CERT, 0.25: 0.50}, BASE_CERT)})
    assert claim.verdict == "does not hold" and "5.0 points at r=0.25" in claim.reason


def test_certified_small_radii_on_few_images_is_a_tie():
    """5 points on 200 images is within two standard errors (9 to 10 points here): neither holds nor fails."""
    [claim] = certified({"sound": summary({**MIX_CERT, 0.25: 0.50}, BASE_CERT, n=200)})
    assert claim.verdict == "inconclusive" and "two standard errors at n=200" in claim.reason


def test_certified_small_radii_falls_back_to_the_smallest_radius():
    # sigma 0.12: no report radius <= 0.06, so the smallest positive one (0.125, below 0.12 Phi^-1(0.9) = 0.154)
    [claim] = certified({"plugin": summary(MIX_CERT, BASE_CERT, sigma=0.12, alpha=0.9)})
    assert claim.verdict == "holds" and claim.numbers.endswith("r=0.125: 70.0% vs 65.0%")
    assert "plug-in radii (no confidence bound) against the baseline's sound CERTIFY radii" in claim.reason


def test_certified_small_radii_only_below_theorem_5s_largest_radius():
    # alpha 0.6: Theorem 5 certifies nothing beyond 0.5 Phi^-1(0.6) = 0.127, so r = 0.25 (0% by construction) is
    # not a small radius there; at r = 0.125 the mixture beats the baseline
    [claim] = certified({"sound": summary({**MIX_CERT, 0.25: 0.0}, BASE_CERT, alpha=0.6)})
    assert claim.verdict == "holds" and claim.numbers.endswith("r=0.125: 70.0% vs 65.0%")
    assert "< sigma * Phi^-1(alpha) = 0.127" in claim.reason and "plug-in" not in claim.reason
    # alpha 0.55: 0.5 Phi^-1(0.55) = 0.063, below every positive report radius
    [claim] = certified({"sound": summary(MIX_CERT, BASE_CERT, alpha=0.55)})
    assert claim.verdict == "inconclusive" and "no positive report radius below sigma * Phi^-1(alpha) = 0.0628" in \
        claim.reason


@pytest.mark.parametrize("kwargs, why", [
    (dict(base=None), "no RS baseline"),
    (dict(base=BASE_CERT, alpha=None, reason="no alpha reaches the target 0.9"), "no alpha reaches the target 0.9"),
    (dict(base=BASE_CERT, clean=0.85), "not matched"),
    (dict(base=BASE_CERT, alpha=1.0), "the selected alpha is 1: the mixture is h alone"),
])
def test_certified_small_radii_inconclusive(kwargs, why):
    [claim] = certified({"sound": summary(MIX_CERT, **kwargs)})
    assert claim.verdict == "inconclusive" and why in claim.reason


# --- attack_strength -----------------------------------------------------------------------------

def autoattack(pairs: dict[float, tuple[float, float]]) -> list[dict]:
    """AutoAttack check rows: alpha -> (MIX PGD accuracy, AutoAttack accuracy), on 360 images."""
    return [r for alpha, (pgd, aa) in pairs.items()
            for r in (row("mix", "mix", pgd, alpha, n=360), row("mix", "autoattack", aa, alpha, n=360, steps=None))]


def test_attack_strength_holds():
    claim = by_key(check_claims(autoattack_rows=autoattack({0.6: (0.40, 0.395), 1.0: (0.45, 0.46)})))["attack_strength"]
    assert claim.verdict == "holds"
    assert claim.numbers == "alpha=0.6: PGD-20 40.0% vs AutoAttack 39.5% (n=360); alpha=1: PGD-20 45.0% vs " \
                            "AutoAttack 46.0% (n=360)"


def test_attack_strength_does_not_hold():
    claim = by_key(check_claims(autoattack_rows=autoattack({0.7: (0.472, 0.369), 1.0: (0.45, 0.45)})))[
        "attack_strength"]
    assert claim.verdict == "does not hold"
    assert "PGD-20 overstates by 10.3 points at alpha=0.7" in claim.reason and "alpha=1" not in claim.reason


def test_attack_strength_without_autoattack_rows_is_inconclusive():
    rows = [r for r in autoattack({0.6: (0.40, 0.30)}) if r["attack"] != "autoattack"]
    claim = by_key(check_claims(autoattack_rows=rows))["attack_strength"]
    assert claim.verdict == "inconclusive" and "autoattack" in claim.reason


# --- the paper column and the table --------------------------------------------------------------

def test_paper_column_only_in_the_papers_setting():
    inputs = dict(fig2_rows=fig2(CLEAN, MIX, WORST), margins=margins())
    assert all(c.paper == "" for c in check_claims(**inputs))
    paper = by_key(check_claims(**inputs, paper_setting=True))
    assert paper["clean_moves"].paper == "g 95.3%, h 83.5%, alpha=0.6 92.0%"
    assert "h PGD-20 45.0%" in paper["mix_jump"].paper and "MIX 39.0%" in paper["mix_jump"].paper
    assert paper["margin_asymmetry"].paper == ("g: clean 0.982 / 0.698, attacked 0.602 / 0.998; "
                                               "h: clean 0.854 / 0.434, attacked 0.768 / 0.635")
    assert paper["attack_strength"].paper == ""


def test_claims_table_escapes_and_omits_an_empty_paper_column():
    claim = Claim("k", "Figure 2", "a | b", "x|y", "", "holds", "because")
    lines = claims_table([claim]).splitlines()
    assert lines[0] == "| claim | numbers | verdict | reason |"
    assert lines[1] == "|---|---|---|---|"
    assert lines[2] == "| Figure 2: a \\| b | x\\|y | **holds** | because |"
    lines = claims_table([claim, Claim("j", "Table 1", "s", "n", "p 1%", "inconclusive", "r")]).splitlines()
    assert lines[0] == "| claim | numbers | paper | verdict | reason |"
    assert lines[2] == "| Figure 2: a \\| b | x\\|y |  | **holds** | because |"
    assert lines[3] == "| Table 1: s | n | p 1% | **inconclusive** | r |"
