"""`s2conv make-checkpoint` and `s2conv info`."""
import json
import subprocess
import sys

from click.testing import CliRunner

from s2conv.cli import cli


def test_info_json_reports_counts_and_codec_config(tiny_checkpoint):
    r = CliRunner().invoke(cli, ["info", str(tiny_checkpoint), "--json", "--check"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["model_tensors"] == 31 and info["model_dtypes"] == {"bfloat16": 31}
    assert info["params"]["model_total"] == 2_765_056 and info["codec_config"]["frame_length"] == 512
    assert info["values_checked"] == 31 + info["codec_tensors"]


def test_info_text(tiny_checkpoint):
    r = CliRunner().invoke(cli, ["info", str(tiny_checkpoint)])
    assert r.exit_code == 0 and "slow_ar 1,181,184" in r.output and "frame_length 512" in r.output


def test_make_checkpoint_command(tmp_path):
    r = CliRunner().invoke(cli, ["make-checkpoint", "--preset", "tiny", "--seed", "3", "-o", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "c" / "codec.pth").is_file() and (tmp_path / "c" / "model.safetensors.index.json").is_file()
    bad = CliRunner().invoke(cli, ["make-checkpoint", "--preset", "huge", "-o", str(tmp_path / "d")])
    assert bad.exit_code == 2 and "tiny" in bad.output


def test_bad_path_is_one_line_error_without_traceback():
    p = subprocess.run([sys.executable, "-m", "s2conv", "info", "/nonexistent"], capture_output=True, text=True)
    assert p.returncode == 1
    assert p.stderr == "error: /nonexistent: no such checkpoint directory\n"
    assert "Traceback" not in p.stderr and p.stdout == ""
