"""Markdown tables for the benchmark scripts' output."""

from __future__ import annotations


def table(title: str, header: list[str], rows: list[list[object]]) -> None:
    """Print a markdown table under a heading; floats with 3 significant digits."""
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row) + " |")
