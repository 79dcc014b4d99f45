"""The paper's qualitative claims checked against a study's results: one row per claim, with a verdict.

`check_claims` takes the parsed results of a study's stages (the Figure 2 and Figure 1 sweeps'
rows from `mixrobust.evaluation.read_results_csv`, margins.json, the certify summaries by mode,
the AutoAttack check's rows) and returns one `Claim` per claim, always the same rows in the same
order; `claims_table` renders them as markdown. A stage that did not run (None) makes its claim
"inconclusive". Thresholds are the module constants below, and every reason names the one it used.
Accuracies are fractions in [0, 1]; a "point" is one percentage point (0.01). A difference inside
the tolerance in both directions (a tie) is "inconclusive": the data cannot tell.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from statistics import NormalDist
from typing import Literal

import numpy as np

from mixrobust.evaluation.options import option_key, option_text

Verdict = Literal["holds", "does not hold", "inconclusive"]
HOLDS: Verdict = "holds"
FAILS: Verdict = "does not hold"
UNSURE: Verdict = "inconclusive"

JUMP_FRACTION = 0.5  # MIX must jump across alpha = 1/2 by this fraction of h's own PGD accuracy
STAY_FRACTION = 0.75  # ... and keep this fraction of it for alpha >= paper_alpha
NEAR_ZERO_FRACTION = 0.25  # ... from below this fraction of it ("near 0") at the last alpha below 1/2
MIN_ROBUST = 0.05  # below this h has no robustness for the mixture to inherit
LEVELS = 11  # clean-accuracy levels at which Figure 1's curves are compared
MIN_OVERLAP = 0.01  # narrowest common clean-accuracy range two curves are compared over
MARGIN_TOLERANCE = 0.02  # Table 1: mean probability gaps closer than this are a tie
MIN_CELL = 10  # Table 1: fewest examples a margin cell needs
REFERENCE = "one/prob"  # the option of eq. (4), the paper's choice
MODES = {"plugin": "Figure 3 (plug-in)", "sound": "Figure 3 (sound)"}
_SAME = 1e-9  # alphas closer than this are one grid point

#: The paper's numbers (CIFAR-10, ResNet-18, l_inf 8/255, PGD-20; method.md). fig2: accuracies (MIX jumps from
#: near 0 to over `mix_above` as alpha crosses 1/2); table1: mean probability gap of clean correct, clean
#: incorrect, PGD correct, PGD incorrect examples.
PAPER = {
    "fig2": {"g_clean": 0.953, "h_clean": 0.835, "h_pgd": 0.45, "alpha": 0.6, "mix_clean": 0.92, "mix_mix": 0.39,
             "mix_above": 0.30},
    "table1": {"g": (0.982, 0.698, 0.602, 0.998), "h": (0.854, 0.434, 0.768, 0.635)},
}

#: key -> (figure, statement), in the order of the rows.
CLAIMS = {
    "clean_moves": ("Figure 2", "h_alpha's clean accuracy moves from g's (alpha = 0) to h's (alpha = 1)."),
    "mix_jump": ("Figure 2", "MIX accuracy is near 0 below alpha = 1/2, jumps across it and stays near h's own "
                             "robust accuracy above it."),
    "r_one_prob_best": ("Figure 1", "R_i = 1 with probability mixing beats the other options at equal clean accuracy."),
    "margin_asymmetry": ("Table 1", "Attacked, h is more confident when right than when wrong, and g stays confident "
                                    "on its mistakes: the asymmetry that makes mixing work."),
    "certified_small_radii": ("Figure 3", "At equal clean accuracy the mixture (Theorem 5) certifies more images than "
                                          "an RS baseline at small radii."),
    "attack_strength": ("Evaluation", "PGD MIX accuracy does not flatter the mixture: AutoAttack finds no more errors "
                                      "(evaluation hygiene, not a paper claim)."),
}


@dataclass(frozen=True)
class Claim:
    """One row of the claims table."""

    key: str  # stable id
    figure: str
    statement: str  # the paper's claim in one sentence
    numbers: str  # the numbers it rests on
    paper: str  # the paper's numbers for the same quantities ("" outside the paper's setting)
    verdict: Verdict
    reason: str  # why, naming the threshold used


def _value(x) -> float | None:
    return None if x is None or math.isnan(float(x)) else float(x)


def pct(x: float | None) -> str:
    """A fraction as a percentage with one decimal ("83.5%"); None or NaN -> "n/a"."""
    return "n/a" if _value(x) is None else f"{100 * float(x):.1f}%"


_P = PAPER["fig2"]
#: The paper column of the claims the paper gives numbers for (with ``paper_setting``).
PAPER_TEXT = {
    "clean_moves": f"g {pct(_P['g_clean'])}, h {pct(_P['h_clean'])}, alpha={_P['alpha']:g} {pct(_P['mix_clean'])}",
    "mix_jump": f"MIX near 0 below 1/2, over {pct(_P['mix_above'])} above; h PGD-20 {pct(_P['h_pgd'])}; "
                f"alpha={_P['alpha']:g}: MIX {pct(_P['mix_mix'])}",
    "margin_asymmetry": "; ".join(f"{m}: clean {c[0]:.3f} / {c[1]:.3f}, attacked {c[2]:.3f} / {c[3]:.3f}"
                                  for m, c in PAPER["table1"].items()),
}


def _pts(x: float) -> str:
    return f"{100 * x:.1f}"


def _claim(kind: str, verdict: Verdict, reason: str, numbers: str = "", mode: str = "") -> Claim:
    """A row of claim `kind` (a key of `CLAIMS`); `mode` names the certify mode of a Figure 3 row."""
    figure, statement = CLAIMS[kind]
    if mode:
        kind, figure = f"{kind}_{mode}", MODES.get(mode, f"{figure} ({mode})")
    return Claim(kind, figure, statement, numbers, "", verdict, reason)


def _judge(kind: str, numbers: str, failed: list[str], holds: bool, why: str, tie: str, mode: str = "") -> Claim:
    """Does not hold if anything `failed` (the reasons, joined), else holds if `holds` (`why`), else a tie."""
    if failed:
        return _claim(kind, FAILS, "; ".join(failed), numbers, mode)
    return _claim(kind, HOLDS, why, numbers, mode) if holds else _claim(kind, UNSURE, tie, numbers, mode)


# --- reading result rows -------------------------------------------------------------------------------

def _label(row: dict) -> str:
    return option_text(option_key(row))


def _base(rows: list[dict], model: str, attack: str) -> float | None:
    """Base model `model`'s accuracy under `attack` (None when absent)."""
    found = [r["accuracy"] for r in rows if r["model"] == model and r["attack"] == attack]
    return _value(found[0]) if found else None


def _curve(rows: list[dict], attack: str, option: str = REFERENCE) -> tuple[np.ndarray, np.ndarray]:
    """(alphas, accuracies) of the mixture `option` under `attack`, sorted by alpha; NaN points dropped."""
    pts = {float(r["alpha"]): _value(r["accuracy"]) for r in rows
           if r["model"] == "mix" and r["attack"] == attack and _label(r) == option}
    alphas = np.array(sorted(a for a, v in pts.items() if v is not None), dtype=np.float64)
    return alphas, np.array([pts[a] for a in alphas.tolist()], dtype=np.float64)


def _at(alphas: np.ndarray, acc: np.ndarray, alpha: float) -> float | None:
    hit = np.flatnonzero(np.abs(alphas - alpha) < _SAME)
    return float(acc[hit[0]]) if hit.size else None


def _closest(alphas: np.ndarray, alpha: float) -> float | None:
    return float(alphas[np.argmin(np.abs(alphas - alpha))]) if alphas.size else None


# --- the claims -----------------------------------------------------------------------------------

def _clean_moves(rows: list[dict], tol: float, paper_alpha: float) -> Claim:
    """Holds if h_alpha's clean accuracy equals g's at alpha 0 and h's at 1 within `tol` and stays between them
    (within `tol`: a mixture may be a little more accurate than both, as an ensemble is) along alpha."""
    g, h = _base(rows, "g", "clean"), _base(rows, "h", "clean")
    alphas, clean = _curve(rows, "clean")
    at0, at1, near = _at(alphas, clean, 0.0), _at(alphas, clean, 1.0), _closest(alphas, paper_alpha)
    mid = f", alpha={near:g} {pct(_at(alphas, clean, near))}" if near is not None else ""
    numbers = f"g {pct(g)}, h {pct(h)}, alpha=0 {pct(at0)}{mid}, alpha=1 {pct(at1)}"
    if None in (at0, at1, g, h):
        return _claim("clean_moves", UNSURE, "no alpha=0 or alpha=1 in the grid (or no g / h clean row)", numbers)
    rule = f" (tolerance {_pts(tol)} points)"
    ends = (("0", at0, g, "g"), ("1", at1, h, "h"))
    failed = [f"alpha={a} differs from {m} by {_pts(abs(v - b))} points{rule}" for a, v, b, m in ends
              if abs(v - b) > tol]
    outside = np.maximum(clean - max(g, h), min(g, h) - clean)
    if outside.size and outside.max() > tol:
        i = int(outside.argmax())
        failed.append(f"at alpha={alphas[i]:g} clean accuracy {pct(clean[i])} leaves the range between g's and h's "
                      f"by {_pts(outside[i])} points{rule}")
    return _judge("clean_moves", numbers, failed, True, "ends match g and h, and it stays between them" + rule, "")


def _mix_jump(rows: list[dict], paper_alpha: float) -> Claim:
    """Holds if MIX is below NEAR_ZERO_FRACTION * rob at the last alpha below 1/2, rises by >= JUMP_FRACTION * rob
    to the first alpha above it, and its minimum over alpha >= paper_alpha is >= STAY_FRACTION * rob (rob: h's
    accuracy under its own PGD). Where the rows hold per-example worst cases, the last part must hold for them too
    (the mixture's worst case against h's, which include the adaptive attack): a mixture that keeps h's robustness
    only under the paper's PGD does not keep it."""
    rob, rob_worst = _base(rows, "h", "rob"), _base(rows, "h", "worst")
    alphas, mix = _curve(rows, "mix")
    low, high, late = alphas < 0.5 - _SAME, alphas > 0.5 + _SAME, alphas >= paper_alpha - _SAME
    below = (float(alphas[low][-1]), float(mix[low][-1])) if low.any() else None
    above = (float(alphas[high][0]), float(mix[high][0])) if high.any() else None
    stay, near = float(mix[late].min()) if late.any() else None, _closest(alphas, paper_alpha)
    worst_alphas, worst = _curve(rows, "worst")
    worst_late = worst_alphas >= paper_alpha - _SAME
    stay_worst = float(worst[worst_late].min()) if worst_late.any() and rob_worst else None
    parts = [f"MIX alpha={p[0]:g} {pct(p[1])}" for p in (below, above) if p]
    parts += [f"min over alpha>={paper_alpha:g} {pct(stay)}", f"h own PGD {pct(rob)}"]
    if stay_worst is not None:
        parts.append(f"worst case: min over alpha>={paper_alpha:g} {pct(stay_worst)}, h {pct(rob_worst)}")
    if near is not None:
        parts.append(f"alpha={near:g}: MIX {pct(_at(alphas, mix, near))}, worst {pct(_at(worst_alphas, worst, near))}")
    numbers = ", ".join(parts)
    if rob is None or rob < MIN_ROBUST:
        return _claim("mix_jump", UNSURE, f"h's own PGD accuracy {pct(rob)} is below {pct(MIN_ROBUST)}: no robustness "
                                          "to carry over", numbers)
    if below is None or above is None or stay is None:
        return _claim("mix_jump", UNSURE, f"no MIX point below 1/2, above 1/2 or at alpha >= {paper_alpha:g}", numbers)
    jump, failed = above[1] - below[1], []
    if below[1] > NEAR_ZERO_FRACTION * rob:
        failed.append(f"MIX at alpha={below[0]:g} is {pct(below[1])}, not near 0 (above {NEAR_ZERO_FRACTION:g} x "
                      f"h's {pct(rob)})")
    if jump < JUMP_FRACTION * rob:
        failed.append(f"the jump across 1/2 ({_pts(jump)} points) is below {JUMP_FRACTION:g} x h's {pct(rob)}")
    if stay < STAY_FRACTION * rob:
        failed.append(f"MIX at alpha >= {paper_alpha:g} falls to {pct(stay)}, below {STAY_FRACTION:g} x h's {pct(rob)}")
    elif stay_worst is not None and stay_worst < STAY_FRACTION * rob_worst:
        failed.append(f"it holds under the paper's PGD only: the worst case at alpha >= {paper_alpha:g} falls to "
                      f"{pct(stay_worst)}, below {STAY_FRACTION:g} x h's worst case {pct(rob_worst)}")
    worst_rule = " (the worst cases too)" if stay_worst is not None else ""
    return _judge("mix_jump", numbers, failed, True, f"MIX rises from below {NEAR_ZERO_FRACTION:g} x h's {pct(rob)} "
                  f"by {_pts(jump)} points >= {JUMP_FRACTION:g} x it and stays >= {STAY_FRACTION:g} x it for "
                  f"alpha >= {paper_alpha:g}{worst_rule}", "")


def _envelope(rows: list[dict], option: str) -> tuple[np.ndarray, np.ndarray]:
    """(clean, attacked) of `option`'s curve as its upper envelope: sorted by clean accuracy, each point's attacked
    ("worst") accuracy raised to the best among points at least as clean, so a non-monotone curve is credited
    with its best trade-off; between points it is interpolated linearly in clean accuracy."""
    (ca, clean), (wa, worst) = _curve(rows, "clean", option), _curve(rows, "worst", option)
    xs, inv = np.unique(clean[np.isin(ca, wa)], return_inverse=True)
    best = np.full(xs.shape, -np.inf)
    np.maximum.at(best, inv, worst[np.isin(wa, ca)])
    return xs, np.maximum.accumulate(best[::-1])[::-1]


def noise(a: float, b: float, n: int) -> float:
    """Two standard errors of the difference of two accuracies `a` and `b` measured on `n` images each: a difference
    below it is not evidence (conservative for the same images, where the two outcomes are correlated)."""
    return 2 * math.sqrt(max(a * (1 - a) + b * (1 - b), 0.0) / n) if n else math.inf


def _r_one_prob_best(rows: list[dict], tol: float) -> Claim:
    """advantage = mean over LEVELS clean levels, within the overlap of the two curves' clean ranges, of
    one/prob's attacked accuracy minus the other option's (`_envelope`); where both curves' clean accuracies all
    lie within tol (an easy data set), the difference of their best attacked accuracies. Each option's margin is
    the larger of tol and the `noise` of the two attacked accuracies. Holds if every advantage is above its margin;
    does not hold if one is below minus its margin; a tie with some option is inconclusive."""
    n = min((int(r["n"]) for r in rows if r["model"] == "mix" and r.get("n")), default=0)
    curves = {o: _envelope(rows, o) for o in dict.fromkeys(_label(r) for r in rows if r["model"] == "mix")}
    curves = {o: c for o, c in curves.items() if c[0].size}
    if REFERENCE not in curves or len(curves) < 2:
        return _claim("r_one_prob_best", UNSURE, f"no {REFERENCE} curve or no other option to compare it with")
    (xr, yr), adv, margin, narrow, parts = curves.pop(REFERENCE), {}, {}, [], []
    for option, (x, y) in curves.items():
        lo, hi = max(xr[0], x[0]), min(xr[-1], x[-1])
        if max(xr[-1], x[-1]) - min(xr[0], x[0]) <= tol:  # every point equally clean: compare the best trade-offs
            ours, theirs = float(yr.max()), float(y.max())
            how = (f"best attacked accuracy; all clean {pct(min(xr[0], x[0]))}-{pct(max(xr[-1], x[-1]))}, equal "
                   f"within {_pts(tol)} points")
        elif hi - lo < MIN_OVERLAP:
            narrow.append(option)
            parts.append(f"{option}: clean ranges overlap by {_pts(max(hi - lo, 0.0))} points")
            continue
        else:
            levels = np.linspace(lo, hi, LEVELS)
            ours, theirs = float(np.mean(np.interp(levels, xr, yr))), float(np.mean(np.interp(levels, x, y)))
            how = f"clean {pct(lo)}-{pct(hi)}"
        adv[option], margin[option] = ours - theirs, max(tol, noise(ours, theirs, n))
        parts.append(f"{option} {100 * adv[option]:+.1f} pts +/- {_pts(margin[option])} ({how})")
    numbers = f"{REFERENCE} minus (n={n}): " + "; ".join(parts)
    failed = [f"{o} beats {REFERENCE} by {_pts(-a)} points, more than {_pts(margin[o])}" for o, a in adv.items()
              if a < -margin[o]]
    if narrow and not failed:
        return _claim("r_one_prob_best", UNSURE, f"the clean range shared with {', '.join(narrow)} is narrower than "
                                                 f"{_pts(MIN_OVERLAP)} points", numbers)
    ties = [o for o, a in adv.items() if a <= margin[o]]
    rule = f"by more than max({_pts(tol)} points, two standard errors)"
    return _judge("r_one_prob_best", numbers, failed, not ties, f"{REFERENCE} beats every option {rule}",
                  f"{REFERENCE} ties {', '.join(ties)} (within max({_pts(tol)} points, two standard errors))")


def _margin_asymmetry(margins: dict) -> Claim:
    """Holds if h's mean gap on attacked images is larger when correct than when wrong, and g's on its attacked
    mistakes larger than h's, both by more than MARGIN_TOLERANCE; does not hold if either is reversed by more."""
    def cell(model: str, images: str, outcome: str) -> dict:
        return ((margins.get(model) or {}).get(images) or {}).get(outcome) or {}

    def show(c: dict) -> str:
        return f"{'n/a' if c.get('mean') is None else format(c['mean'], '.3f')} (n={c.get('n', 0)})"

    numbers = "; ".join(f"{m}: clean {show(cell(m, 'clean', 'correct'))} / {show(cell(m, 'clean', 'incorrect'))}, "
                        f"attacked {show(cell(m, 'attacked', 'correct'))} / {show(cell(m, 'attacked', 'incorrect'))}"
                        for m in ("g", "h")) + " (correct / incorrect)"
    need = {f"{m} attacked {o}": cell(m, "attacked", o) for m, o in (("h", "correct"), ("h", "incorrect"),
                                                                     ("g", "incorrect"))}
    thin = [k for k, c in need.items() if c.get("mean") is None or (c.get("n") or 0) < MIN_CELL]
    if thin:
        return _claim("margin_asymmetry", UNSURE, f"fewer than {MIN_CELL} examples in: {', '.join(thin)}", numbers)
    h_ok, h_wrong, g_wrong = (c["mean"] for c in need.values())
    gaps = {"h attacked correct > incorrect": h_ok - h_wrong, "g attacked incorrect > h's": g_wrong - h_wrong}
    shown = ", ".join(f"{d:+.3f}" for d in gaps.values())
    failed = [f"reversed by more than {MARGIN_TOLERANCE:g}: {k} ({d:+.3f})" for k, d in gaps.items()
              if d < -MARGIN_TOLERANCE]
    return _judge("margin_asymmetry", numbers, failed, min(gaps.values()) > MARGIN_TOLERANCE,
                  f"both hold by more than {MARGIN_TOLERANCE:g} ({shown})",
                  f"a difference is within {MARGIN_TOLERANCE:g} ({shown})")


def _certified(mode: str, summary: dict, tol: float) -> Claim:
    """Small radii: the positive report radii <= sigma / 2 (else the smallest positive one) that Theorem 5 can
    certify at the selected alpha (below sigma * Phi^-1(alpha), where its radius is capped). With margin = max(tol,
    `noise`): holds if at each the mixture's Theorem-5 accuracy at the selected alpha is >= the baseline's - margin
    and above it + margin at one; does not hold if below by more than the margin at one; needs the selected
    alpha's clean accuracy within 2 tol of the baseline's, and alpha < 1 (at 1 the mixture is h alone)."""
    kind, clean, table = "certified_small_radii", summary.get("clean_accuracy") or {}, summary["certified_accuracy"]
    sel, base, base_clean = summary.get("alpha_selection") or {}, table.get("baseline"), clean.get("baseline")
    models = f"clean: g {pct(clean.get('g'))}, smoothed h {pct(clean.get('h'))}, baseline {pct(base_clean)}"
    if base is None or base_clean is None:
        return _claim(kind, UNSURE, "no RS baseline was certified", models, mode)
    if (alpha := sel.get("alpha")) is None:
        return _claim(kind, UNSURE, f"no alpha selected: {sel.get('reason')}", models, mode)
    alpha, name, sigma = float(alpha), repr(float(alpha)), float(summary["sigma"])
    mix, mix_clean = table.get("mix", {}).get(name, {}), (clean.get("mix") or {}).get(name)
    numbers = f"alpha={alpha:g}: clean {pct(mix_clean)} vs baseline {pct(base_clean)}"
    if alpha >= 1 - _SAME:
        return _claim(kind, UNSURE, "the selected alpha is 1: the mixture is h alone, so this would compare two RS "
                                    "models, not mixing (a baseline more accurate than h gives an alpha below 1)",
                      numbers, mode)
    if mix_clean is None or abs(mix_clean - base_clean) > 2 * tol:
        return _claim(kind, UNSURE, f"clean accuracy not matched: {pct(mix_clean)} vs {pct(base_clean)}, more than "
                                    f"{_pts(2 * tol)} points apart", numbers, mode)
    cap = sigma * NormalDist().inv_cdf(alpha) if alpha > 0.5 else 0.0  # Theorem 5's largest radius at alpha
    radii = sorted(float(r) for r in (summary.get("settings") or {}).get("report_radii", ())
                   if 0 < float(r) < cap - _SAME)
    small = [r for r in radii if r <= sigma / 2 + _SAME] or radii[:1]
    if not small:
        return _claim(kind, UNSURE, f"no positive report radius below sigma * Phi^-1(alpha) = {cap:.3g}, the largest "
                                    "radius Theorem 5 certifies at this alpha: add smaller certify.report_radii",
                      numbers, mode)
    pairs = [(r, mix.get(f"cert/rs_acc@{r:g}"), base.get(f"cert/baseline_acc@{r:g}")) for r in small]
    numbers += "".join(f"; r={r:g}: {pct(m)} vs {pct(b)}" for r, m, b in pairs)
    if any(m is None or b is None for _, m, b in pairs):
        return _claim(kind, UNSURE, "no certified accuracy at a positive report radius", numbers, mode)
    n = int(summary.get("n_examples") or 0)
    diff = np.array([m - b for _, m, b in pairs])
    margin = np.array([max(tol, noise(m, b, n)) for _, m, b in pairs])
    rule = (f"radii <= sigma/2 = {sigma / 2:g} and < sigma * Phi^-1(alpha) = {cap:.3g}, margin max({_pts(tol)} "
            f"points, two standard errors at n={n})")
    if mode == "plugin":  # summary["baseline_radius"]: the baseline is certified by CERTIFY in both modes
        rule += ("; the mixture's plug-in radii (no confidence bound) against the baseline's sound CERTIFY radii "
                 "favour the mixture: the sound row compares like with like")
    failed = [f"below the baseline by {_pts(-d)} points at r={r:g} ({rule})" for r, d, t in zip(small, diff, margin)
              if d < -t]
    return _judge(kind, numbers, failed, bool((diff > margin).any()), f"never below the baseline and above it at "
                  f"some radius ({rule})", f"ties the baseline at every small radius ({rule})", mode)


def _attack_strength(rows: list[dict], tol: float) -> Claim:
    """Holds if at every alpha of the AutoAttack check its MIX PGD accuracy exceeds AutoAttack's by at most `tol`
    (both on the same images: the check's own "mix" rows)."""
    found = {a: {(_label(r), float(r["alpha"])): r for r in rows
                 if r["model"] == "mix" and r["attack"] == a and _value(r["accuracy"]) is not None}
             for a in ("autoattack", "mix")}
    both = [k for k in found["autoattack"] if k in found["mix"]]
    if not both:
        return _claim("attack_strength", UNSURE, "no autoattack row with a MIX PGD row at the same alpha")
    parts, failed = [], []
    for option, alpha in both:
        aa, pgd = found["autoattack"][option, alpha], found["mix"][option, alpha]
        where = f"alpha={alpha:g}" + ("" if option == REFERENCE else f" ({option})")
        attack, gap = f"PGD-{pgd['steps']}" if pgd.get("steps") else "PGD", pgd["accuracy"] - aa["accuracy"]
        parts.append(f"{where}: {attack} {pct(pgd['accuracy'])} vs AutoAttack {pct(aa['accuracy'])} (n={aa['n']})")
        if gap > tol:
            failed.append(f"{attack} overstates by {_pts(gap)} points at {where} (tolerance {_pts(tol)} points)")
    return _judge("attack_strength", "; ".join(parts), failed, True,
                  f"PGD exceeds AutoAttack by at most {_pts(tol)} points at every alpha", "")


def _given(kind: str, data, stage: str, check) -> Claim:
    """`check(data)`, or an inconclusive row when `stage` did not run (`data` None)."""
    return check(data) if data is not None else _claim(kind, UNSURE, f"{stage} did not run")


def check_claims(fig2_rows: list[dict] | None = None, fig1_rows: list[dict] | None = None,
                 margins: dict | None = None, certify: dict[str, dict] | None = None,
                 autoattack_rows: list[dict] | None = None, *, paper_setting: bool = False,
                 tolerance: float = 0.01, paper_alpha: float = 0.6) -> list[Claim]:
    """One `Claim` per claim of `CLAIMS`, in that order (Figure 3: one per mode of `certify`, plug-in first).

    `paper_setting`: the study ran the paper's setting (CIFAR-10, ResNet-18, l_inf 8/255), so the
    paper column gets `PAPER`'s numbers. `tolerance`: accuracy differences this small are noise.
    `paper_alpha`: the paper's operating point (the closest grid alpha is reported).
    """
    modes = [m for m in MODES if m in (certify or {})] + sorted(set(certify or {}) - set(MODES))
    figure3 = [_certified(m, certify[m], tolerance) for m in modes] or [
        _given("certified_small_radii", None, "the certify stage", None)]
    claims = [_given("clean_moves", fig2_rows, "the Figure 2 sweep", lambda r: _clean_moves(r, tolerance, paper_alpha)),
              _given("mix_jump", fig2_rows, "the Figure 2 sweep", lambda r: _mix_jump(r, paper_alpha)),
              _given("r_one_prob_best", fig1_rows, "the Figure 1 sweep", lambda r: _r_one_prob_best(r, tolerance)),
              _given("margin_asymmetry", margins, "the margins stage", _margin_asymmetry), *figure3,
              _given("attack_strength", autoattack_rows, "the AutoAttack stage",
                     lambda r: _attack_strength(r, tolerance))]
    return [replace(c, paper=PAPER_TEXT.get(c.key, "")) for c in claims] if paper_setting else claims


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def md_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub markdown table ("|" in a cell escaped)."""
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows])


def claims_table(claims: list[Claim]) -> str:
    """claim | numbers | paper | verdict (bold) | reason; no paper column when it is empty."""
    paper = any(c.paper for c in claims)
    head = ["claim", "numbers", *(["paper"] if paper else []), "verdict", "reason"]
    return md_table(head, [[f"{c.figure}: {c.statement}", c.numbers, *([c.paper] if paper else []),
                            f"**{c.verdict}**", c.reason] for c in claims])
