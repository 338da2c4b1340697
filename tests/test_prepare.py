"""Default-model preparation: idempotent, and a broken folder is detected and rebuilt."""

from __future__ import annotations

import shutil

import pytest

from inference import prepare


def test_prepared_folder_is_complete(smollm2_dir):
    assert prepare.check_model_dir(smollm2_dir) == []
    assert prepare.prepare_default_model() == smollm2_dir  # idempotent: nothing rebuilt


def test_broken_folder_is_reported(smollm2_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(smollm2_dir, broken, ignore=shutil.ignore_patterns("model.safetensors"))
    assert "missing model.safetensors" in prepare.check_model_dir(broken)
    (broken / "model.safetensors").write_bytes(b"x" * 10)
    assert "model.safetensors is truncated" in prepare.check_model_dir(broken)


@pytest.mark.slow
def test_broken_cache_is_rebuilt(smollm2_dir, tmp_path, monkeypatch):
    # Reuse the downloaded GGUF so the test does not fetch the wheel again.
    home = tmp_path / "home"
    (home / "downloads").mkdir(parents=True)
    gguf = prepare.pagedinfer_home() / "downloads" / prepare.GGUF_NAME
    if not gguf.is_file():
        pytest.skip("no cached GGUF to rebuild from")
    (home / "downloads" / prepare.GGUF_NAME).symlink_to(gguf)
    monkeypatch.setenv("PAGEDINFER_HOME", str(home))
    target = prepare.default_model_dir()
    target.mkdir(parents=True)
    (target / "config.json").write_text("{")  # a crash left this behind
    assert prepare.prepare_default_model() == target
    assert prepare.check_model_dir(target) == []
