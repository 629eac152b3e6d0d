"""Tables of OwlEval grades: per category (beside the paper's human grades) and per ability."""

from __future__ import annotations

from collections.abc import Sequence

from owl_jax.eval.grades import GRADES, SCORES, UNPARSEABLE
from owl_jax.eval.owleval import ABILITIES, CATEGORIES

SHORT_ABILITIES = {"a": "instruction", "b": "visual", "c": "OCR", "d": "knowledge", "e": "reasoning", "f": "multi-turn"}
# Human grades of mPLUG-Owl 7B in the paper (arXiv 2304.14178), for reference beside a judge's grades.
PAPER = {
    "mPLUG-Owl 7B (paper, human)": {
        "single_turn": {"A": 32, "B": 10, "C": 8, "D": 0},
        "multi_turn": {"A": 31, "B": 8, "C": 13, "D": 0},
    }
}


def summarize(grades: Sequence[dict]) -> dict:
    """Tables from grade rows, per model in order of appearance.

    Returns `{"models": {model_id: {"category": {cat: {"n", "counts": {A, B, C, D, ?}, "percent": {...}}},
    "ability": {letter: {"n", "graded", "unparseable", "a_or_b", "mean_score"}}}}, "paper": PAPER}`.
    Category percentages are of all answers in the category ("?" included, so a row sums to 100); the
    ability share of A+B (in %) and mean score (A=3 .. D=0) are over graded answers only (None if none).
    """
    models: dict[str, dict] = {}
    for row in grades:
        m = models.setdefault(
            row["model_id"],
            {
                "category": {c: dict.fromkeys((*GRADES, UNPARSEABLE), 0) for c in CATEGORIES},
                "ability": {a: [] for a in ABILITIES},
            },
        )
        for c in row["category"]:
            m["category"][c][row["grade"]] += 1
        for a in str(row["ability"]).split(","):
            if a.strip() in m["ability"]:
                m["ability"][a.strip()].append(row["grade"])
    out: dict[str, dict] = {}
    for name, m in models.items():
        cats = {}
        for c, counts in m["category"].items():
            n = sum(counts.values())
            cats[c] = {"n": n, "counts": counts, "percent": {g: 100 * k / n if n else 0.0 for g, k in counts.items()}}
        abilities = {}
        for a, got in m["ability"].items():
            graded = [g for g in got if g in SCORES]
            abilities[a] = {
                "n": len(got),
                "graded": len(graded),
                "unparseable": len(got) - len(graded),
                "a_or_b": 100 * sum(g in ("A", "B") for g in graded) / len(graded) if graded else None,
                "mean_score": sum(SCORES[g] for g in graded) / len(graded) if graded else None,
            }
        out[name] = {"category": cats, "ability": abilities}
    return {"models": out, "paper": PAPER}


def format_tables(tables: dict) -> str:
    """The `summarize` tables as text: one block per category (the paper's row beside), then abilities."""
    names = list(tables["models"]) + list(tables["paper"])
    width = max([len(n) for n in names] + [5]) + 2
    lines = []
    for c in CATEGORIES:
        lines.append(f"{c}: count (% of answers; ? = no grade)")
        lines.append("model".ljust(width) + "n".rjust(4) + "".join(g.rjust(13) for g in (*GRADES, UNPARSEABLE)))
        rows = [(name, m["category"][c]["counts"]) for name, m in tables["models"].items()]
        rows += [(name, {**p[c], UNPARSEABLE: None}) for name, p in tables["paper"].items()]
        for name, counts in rows:
            n = sum(v for v in counts.values() if v)
            cells = [
                "-" if counts[g] is None else f"{counts[g]} ({100 * counts[g] / n if n else 0:.1f}%)"
                for g in (*GRADES, UNPARSEABLE)
            ]
            lines.append(name.ljust(width) + str(n).rjust(4) + "".join(cell.rjust(13) for cell in cells))
        lines.append("")
    lines.append("ability: % A+B of graded answers, mean score (A=3 .. D=0), answers [?: no grade]")
    lines.append("model".ljust(width) + "".join(f"{a} {label}".rjust(22) for a, label in SHORT_ABILITIES.items()))
    for name, m in tables["models"].items():
        cells = []
        for a in ABILITIES:
            s = m["ability"][a]
            cell = "-" if s["a_or_b"] is None else f"{s['a_or_b']:.0f}% {s['mean_score']:.2f}"
            cell += f" n={s['n']}" + (f" ?{s['unparseable']}" if s["unparseable"] else "")
            cells.append(cell.rjust(22))
        lines.append(name.ljust(width) + "".join(cells))
    return "\n".join(lines)
