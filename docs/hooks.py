"""mkdocs hooks: tables the pages take from the code, so they are written once and cannot drift.

    <!-- protocol -->   every name a layer or container may define (purenet.layers.protocol.PROTOCOL)
    <!-- rules -->      which product kinds each feature has a rule for (the features' rule tables)
    <!-- include benchmarks/README.md -->   that file, its links to ../docs/ made relative to the page
"""
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _protocol_table() -> str:
    from purenet.layers.protocol import KINDS, PROTOCOL

    rows = ["| name | kind | meaning |", "|---|---|---|"]
    for kind in KINDS:
        rows += [f"| `{name}` | {kind} | {entry.meaning.replace('|', '&#124;')} |"
                 for name, entry in PROTOCOL.items() if entry.kind == kind]
    return "\n".join(rows)


def _rules_table() -> str:
    from purenet.analysis import kfac, per_example, stats
    from purenet.layers import structure
    from purenet.privacy import clipping

    features = [("per-example gradients", "analysis/per_example.GRADS", per_example.GRADS),
                ("per-example norms", "analysis/per_example.SQ_NORMS", per_example.SQ_NORMS),
                ("one-pass clipping", "privacy/clipping.WEIGHTED_SUMS", clipping.WEIGHTED_SUMS),
                ("sums of squares", "analysis/stats.SQUARE_RULES", stats.SQUARE_RULES),
                ("curvature columns", "analysis/stats.COLUMN_RULES", stats.COLUMN_RULES),
                ("Gram matrix", "analysis/stats.GRAM_RULES", stats.GRAM_RULES),
                ("K-FAC", "analysis/kfac.KFAC_RULES", kfac.KFAC_RULES)]
    kinds = structure.KINDS
    rows = ["| feature | table | " + " | ".join(k.__name__ for k in kinds) + " |",
            "|---|---|" + "---|" * len(kinds)]
    for name, where, table in features:
        cells = ["rule" if k in table else ("none" if name == "K-FAC" else "from gradients") for k in kinds]
        rows.append(f"| {name} | `{where}` | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _include(match: re.Match) -> str:
    """A file of the repository, its images under docs/ linked from a page one level below docs/."""
    text = (ROOT / match.group(1)).read_text()
    return text.replace("](../docs/", "](../")


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    """Fill the generated tables and included files into a page that asks for them."""
    markdown = re.sub(r"<!-- include (\S+) -->", _include, markdown)
    if "<!-- protocol -->" in markdown:
        markdown = markdown.replace("<!-- protocol -->", _protocol_table())
    if "<!-- rules -->" in markdown:
        markdown = markdown.replace("<!-- rules -->", _rules_table())
    return markdown
