"""Pastes bench/results/latest.md, probe.txt and perf-summary.txt into docs/performance.md,
between its `results`, `probe` and `perf` markers, so the page's numbers are the last run's.

    bench/.venv/bin/python bench/update_doc.py
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "performance.md"
RESULTS = ROOT / "bench" / "results"


def paste(text: str, name: str, body: str) -> str:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body.strip()}\n{end}{tail}"


def main() -> None:
    doc = DOC.read_text()
    table = (RESULTS / "latest.md").read_text()
    # The run's own title becomes a plain line under the page's "Results" heading.
    table = table.replace("# PyProxy benchmark — ", "Run of ", 1).replace("## Issue 7 targets", "#### Issue 7 targets")
    doc = paste(doc, "results", table)
    probe = RESULTS / "probe.txt"
    if probe.exists():
        doc = paste(doc, "probe", "Output of `bench/probe.py` from the same session:\n\n```text\n" + probe.read_text().strip() + "\n```")
    perf = RESULTS / "perf-summary.txt"
    if perf.exists():
        doc = paste(doc, "perf", "```text\n" + perf.read_text().strip() + "\n```")
    DOC.write_text(doc)


if __name__ == "__main__":
    main()
