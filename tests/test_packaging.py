"""What a wheel carries and what it asks of an existing environment: the Hydra configs and the embedded teacher
inside the package (a wheel works without the source checkout), and a torch requirement an existing CUDA PyTorch
(an NGC container) already satisfies; the CPU wheel comes from the `cpu` extra."""

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_torch_is_a_range_and_the_cpu_extra_pins_the_cpu_wheel():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_req = [d for d in meta["dependencies"] if d.replace(" ", "").startswith("torch")]
    assert torch_req == ["torch>=2.6"]
    assert meta["optional-dependencies"]["cpu"] == ["torch==2.13.0"]


def test_wheel_carries_the_configs_and_the_teacher(tmp_path):
    leftover = ROOT / "build"
    existed = leftover.exists()
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    if not existed:  # setuptools builds in the source tree
        shutil.rmtree(leftover, ignore_errors=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("dms_megatron-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"dms_megatron/configs/refit.yaml", "dms_megatron/configs/eval.yaml",
            "dms_megatron/configs/model/qwen3-8b.yaml", "dms_megatron/configs/parallel/dp2.yaml"} <= names
    teacher = ROOT / "dms_megatron" / "assets" / "tiny_teacher"
    shipped = {p.relative_to(ROOT).as_posix() for p in teacher.rglob("*") if p.is_file()}
    assert shipped and shipped <= names and "dms_megatron/assets/tiny_teacher.sha256" in names

    # installed from the wheel alone (no checkout on the path), the launcher finds its configs and teacher
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), WANDB_MODE="disabled")
    where = subprocess.run([sys.executable, "-c", "import dms_megatron; print(dms_megatron.__file__)"], env=env,
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert where.stdout.strip().startswith(str(site)), where
    run = subprocess.run([sys.executable, "-m", "dms_megatron.launch.refit", "--prepare-only", "parallel=dp2",
                          f"hydra.run.dir={tmp_path / 'run'}"], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_the_configs_live_at_the_top_level_and_the_package_reaches_them():
    """configs/ at the repository's top level holds every Hydra config; the package's config dir is that folder."""
    from dms_megatron.launch.hydra_cli import CONFIG_DIR

    top = sorted(p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs").rglob("*.yaml"))
    assert {"refit.yaml", "eval.yaml", "hyperscale.yaml", "model/tiny.yaml", "parallel/h100_256.yaml"} <= set(top)
    assert CONFIG_DIR.resolve() == (ROOT / "configs").resolve()
    assert sorted(p.relative_to(CONFIG_DIR).as_posix() for p in CONFIG_DIR.rglob("*.yaml")) == top
