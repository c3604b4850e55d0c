"""The measured tables of README.md and docs/ are what scripts/write_tables.py makes of the result JSONs."""
import os
import shutil

from scripts import write_tables


def test_the_docs_tables_are_those_the_jsons_give(capsys):
    assert write_tables.main(["--check"]) == 0, capsys.readouterr().out


def test_check_names_a_table_whose_figure_was_edited_by_hand(tmp_path, monkeypatch, capsys):
    os.makedirs(tmp_path / "docs")
    for doc in ("README.md", "docs/evaluation.md"):
        shutil.copy(os.path.join(write_tables.ROOT, doc), tmp_path / doc)
    monkeypatch.setattr(write_tables, "ROOT", str(tmp_path))
    assert write_tables.main(["--check"]) == 0
    text = (tmp_path / "docs" / "evaluation.md").read_text()
    assert text.count("| 40% | 167.42 |") == 1
    (tmp_path / "docs" / "evaluation.md").write_text(text.replace("| 40% | 167.42 |", "| 40% | 121.70 |"))
    capsys.readouterr()
    assert write_tables.main(["--check"]) == 1
    assert "docs/evaluation.md: table update" in capsys.readouterr().out
    assert write_tables.main([]) == 0  # rewrites it from the JSONs
    assert (tmp_path / "docs" / "evaluation.md").read_text() == text
