"""The command layer: numeric options are checked where they are parsed, with one line of error."""
import pytest

from fastdream.cli import build_parser, main


@pytest.mark.parametrize("argv, option, wanted", [
    (["run", "a cat", "--steps", "2.5"], "--steps", "an integer"),
    (["run", "a cat", "--seed", "1.5"], "--seed", "an integer >= 0"),
    (["export", "d", "--threshold", "nan"], "--threshold", "a finite number"),
    (["export", "d", "--mesh-resolution", "4"], "--mesh-resolution", "an integer >= 8"),
    (["fit", "--demo", "--rays", "0"], "--rays", "an integer >= 1"),
    (["fit", "--demo", "--near-gradient", "-0.5"], "--near-gradient", "a finite number >= 0"),
    (["eval", "r", "--prompts", "p.txt", "--fov", "inf"], "--fov", "a finite number > 0 and < 180"),
    (["eval", "r", "--prompts", "p.txt", "--elevation", "100"], "--elevation", "a finite number >= -90 and <= 90"),
    (["batch", "p.txt", "--out", "o", "--cpus-per-task", "-1"], "--cpus-per-task", "a finite number > 0"),
])
def test_bad_numbers_are_one_line_errors(argv, option, wanted, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"fastdream {argv[0]}: error: argument {option}: must be {wanted}"), err


def test_good_numbers_parse():
    args = build_parser().parse_args(["eval", "r", "--prompts", "p.txt", "--fov", "50", "--elevation", "-10"])
    assert args.fov == 50.0 and args.elevation == -10.0
    assert build_parser().parse_args(["run", "a cat", "--steps", "1"]).steps == 1


def test_every_command_is_listed():
    names = set(build_parser()._subparsers._group_actions[0].choices)
    assert names == {"run", "export", "fit", "eval", "batch", "view", "doctor"}


def test_doctor_prints_the_backend(capsys):
    assert main(["doctor"]) == 0
    assert "backend in use" in capsys.readouterr().out
