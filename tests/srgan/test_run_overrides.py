"""`crappify run`'s run-wide overrides reach every stage that has the option (--no-pretrained, --precision,
--device), so a real-size pipeline runs offline with the flag its own error message names."""

from __future__ import annotations

from srgan.pipeline import find_pipeline, load_pipeline, stage_configs


def test_no_pretrained_reaches_every_stage_that_loads_weights(tmp_path):
    p = load_pipeline(find_pipeline("flickr30k-lesson7"), str(tmp_path / "out"))
    before = stage_configs(p)
    assert before["train-gen"].pretrained and before["train-gan"].pretrained  # the course's recipe
    after = stage_configs(p, {"pretrained": False, "precision": "fp32", "device": "cpu"})
    for stage in ("train-gen", "train-gan"):
        assert after[stage].pretrained is False
    for cfg in after.values():
        if "precision" in type(cfg).model_fields:
            assert cfg.precision == "fp32"
        if "device" in type(cfg).model_fields:
            assert cfg.device == "cpu"


def test_run_command_takes_no_pretrained(cli, tmp_path):
    res = cli("run", "flickr30k-lesson7", "--no-pretrained", "--dry-run", "-o", tmp_path / "out", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "train-gen" in res.stdout and "Traceback" not in res.stderr
