import subprocess
import sys

from research.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    out = subprocess.run([sys.executable, "-m", "research", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for name in COMMANDS:
        assert name in out


def test_unknown_command_names_the_valid_ones(capsys):
    try:
        main(["trian"])
    except SystemExit as exc:
        assert exc.code == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and "train" in err
