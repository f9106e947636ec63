"""The data benchmark's BENCHMARKS.md update keeps every other section intact."""

from __future__ import annotations

from benchmarks.data_throughput import write_section


def test_section_is_created_then_replaced_in_place(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    write_section(path, "## Data pipeline\n\nfirst\n")
    assert path.read_text().startswith("# Benchmarks\n") and "first" in path.read_text()
    path.write_text(path.read_text() + "\n## Models\n\nkeep me\n")
    write_section(path, "## Data pipeline\n\nsecond\n")
    text = path.read_text()
    assert "first" not in text and "second" in text and "## Models\n\nkeep me" in text
    assert text.index("## Data pipeline") < text.index("## Models")


def test_section_is_appended_after_other_sections(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## Models\n\nkeep me\n")
    write_section(path, "## Data pipeline\n\nnew\n")
    assert path.read_text() == "# Benchmarks\n\n## Models\n\nkeep me\n\n## Data pipeline\n\nnew\n"
