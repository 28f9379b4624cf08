"""`python -m retrain` commands other than the stages: argument checks and what they refuse."""

import tarfile

import pytest

from retrain.__main__ import main


def run(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err


def test_synth_writes_a_readable_tarball(tmp_path, capsys):
    dest = tmp_path / "set.tgz"
    assert main(["synth", str(dest), "--classes", "2", "--per-class", "3", "--size", "16"]) == 0
    with tarfile.open(dest) as tar:
        images = [m.name for m in tar.getmembers() if m.name.endswith(".jpg")]
    assert len(images) == 6


@pytest.mark.parametrize("flag, value, message", [
    ("--classes", "1", "argument --classes: expected at least 2, got 1"),
    ("--per-class", "-1", "argument --per-class: expected at least 1, got -1"),
    ("--size", "0", "argument --size: expected at least 8, got 0"),
    ("--seed", "x", "argument --seed: expected an integer, got 'x'"),
])
def test_synth_refuses_arguments_that_make_no_dataset(tmp_path, capsys, flag, value, message):
    code, err = run(["synth", str(tmp_path / "set.tgz"), flag, value], capsys)
    assert code == 2 and err.strip().endswith(message)
    assert list(tmp_path.iterdir()) == []


def test_synth_never_replaces_a_folder(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep")
    code, err = run(["synth", str(folder)], capsys)
    assert code == 1 and err.strip() == f"error: {folder}: is a folder; name a file to write"
    assert (folder / "notes.txt").read_text() == "keep"
