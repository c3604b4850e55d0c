"""The measured tables of README.md and docs/ are what scripts/write_tables.py makes of the result JSONs."""
import os
import shutil

import pytest

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


def _copy_docs(tmp_path) -> None:
    os.makedirs(tmp_path / "docs")
    for doc in write_tables.DOCS:
        if os.path.isfile(os.path.join(write_tables.ROOT, doc)):
            shutil.copy(os.path.join(write_tables.ROOT, doc), tmp_path / doc)


def _marked_tables() -> list[tuple[str, str]]:
    found = []
    for doc in write_tables.DOCS:
        path = os.path.join(write_tables.ROOT, doc)
        if os.path.isfile(path):
            found += [(doc, m["name"]) for m in write_tables.MARKED.finditer(open(path, encoding="utf-8").read())]
    return found


def test_every_table_has_a_marker_and_the_named_ones_are_generated():
    # the tables the issue named (sweep, refinement, LoRA, scale) and the earlier six all sit between markers
    names = {name for _, name in _marked_tables()}
    assert names == set(write_tables.TABLES)
    assert {"efficiency", "refinement", "lora_text", "lora_alpaca", "scale"} <= names


@pytest.mark.parametrize("doc,name", _marked_tables())
def test_check_fails_on_each_stale_table(doc, name, tmp_path, monkeypatch, capsys):
    """A hand edit of any figure in any generated table (a data row, not its caption) makes --check fail
    naming that table, and a plain run writes the JSONs' figure back."""
    _copy_docs(tmp_path)
    monkeypatch.setattr(write_tables, "ROOT", str(tmp_path))
    path = tmp_path / doc
    text = path.read_text(encoding="utf-8")
    match = next(m for m in write_tables.MARKED.finditer(text) if m["name"] == name)
    body = match["body"]
    row_start = body.index("\n|---") + 1
    row_start = body.index("\n", row_start) + 1  # the first data row
    digit = next(i for i in range(row_start, len(body)) if body[i].isdigit())
    edited = body[:digit] + str((int(body[digit]) + 1) % 10) + body[digit + 1:]
    path.write_text(text[:match.start("body")] + edited + text[match.end("body"):], encoding="utf-8")
    capsys.readouterr()
    assert write_tables.main(["--check"]) == 1
    assert f"{doc}: table {name}" in capsys.readouterr().out
    assert write_tables.main([]) == 0
    assert path.read_text(encoding="utf-8") == text
