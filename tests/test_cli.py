import json
import os
import subprocess
import sys
from pathlib import Path

from research.cli import COMMANDS, main

REPO = Path(__file__).resolve().parent.parent


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


def test_train_help_and_a_config_typo_answer_before_torch_and_mlflow_load(tmp_path):
    """`train`'s parser and config checks live in research/train_cli.py; the trainer (torch, timm, MLflow: seconds
    of imports) loads only when a run starts. In a child: `split --help` (torch loads where an image is augmented),
    `train --help`, then a config with an unknown key."""
    (tmp_path / "typo.yaml").write_text("model: resnet18\nbatchsize: 8\n")
    script = ("import contextlib, io, json, sys\nfrom research.cli import main\n"
              "with contextlib.redirect_stdout(io.StringIO()) as help_text:\n"
              "    for command in ('split', 'train'):\n"
              "        try:\n            main([command, '--help'])\n"
              "        except SystemExit as exc:\n            help_code = exc.code\n"
              "code = main(['train', '--config', 'typo.yaml'])\n"
              "print(json.dumps({'help': help_code, 'shown': '--resume' in help_text.getvalue(), 'typo': code,\n"
              "                  'loaded': [m for m in ('torch', 'mlflow') if m in sys.modules]}))")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env | {"PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"help": 0, "shown": True, "typo": 2, "loaded": []}, (result, out.stderr[-2000:])
    assert "Unknown config key 'batchsize'. Did you mean 'batch_size'?" in out.stderr
