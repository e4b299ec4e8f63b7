"""deployments/docker: the Dockerfiles install streamem as README.md says.

No image can be built on these machines, so this checks what a build would run: the
README's quick-start install is a RUN step of both Dockerfiles, every other pip step
is a command the README gives, the extras they name exist, the base images' Python
satisfies ``requires-python``, the CUDA image is an NVIDIA CUDA runtime with the
``[gpu]`` extra, and the build context leaves out the virtual environment.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "deployments" / "docker"
DOCKERFILES = ["Dockerfile", "Dockerfile.cuda"]
#: Python 3 of the distribution base images we use (python:X.Y images say it in the tag).
DISTRO_PYTHON = {"ubuntu24.04": (3, 12), "ubuntu22.04": (3, 10)}


def _readme() -> str:
    return (REPO / "README.md").read_text()


def _run_steps(dockerfile: str) -> list[str]:
    """The RUN instructions, continuation lines joined."""
    text = (DOCKER / dockerfile).read_text().replace("\\\n", " ")
    return [" ".join(ln.split()[1:]) for ln in text.splitlines() if ln.startswith("RUN ")]


def _quick_start_install() -> str:
    """The README's quick-start command up to the demo: the install a fresh machine runs."""
    block = _readme().split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    (command,) = [ln for ln in block.splitlines() if ln.strip()]
    install, sep, _ = command.partition(" && streamem ")
    assert sep, command
    return install.strip()


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_installs_as_the_readme_says(dockerfile):
    steps = _run_steps(dockerfile)
    install = _quick_start_install()
    assert install == "python3 -m venv .venv && . .venv/bin/activate && pip install -e ."
    assert install in steps, steps
    readme = _readme()
    for step in steps:
        for pip in re.findall(r"pip install [^&]+", step):
            assert pip.strip() in readme, f"{dockerfile}: {pip!r} is not a README command"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_extras_exist_and_python_is_new_enough(dockerfile):
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    text = (DOCKER / dockerfile).read_text()
    for extra in re.findall(r'pip install -e "\.\[([a-z,]+)\]"', text):
        for name in extra.split(","):
            assert name in project["optional-dependencies"], name
    (base,) = re.findall(r"^FROM (\S+)", text, flags=re.M)
    tag = base.split(":", 1)[1]
    if base.startswith("python:"):
        version = tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", tag).groups())
    else:
        (distro,) = [d for d in DISTRO_PYTHON if d in tag]
        version = DISTRO_PYTHON[distro]
        assert "python3-venv" in text  # `python3 -m venv` needs it on Debian/Ubuntu
    required = tuple(
        int(x) for x in re.match(r">=(\d+)\.(\d+)", project["requires-python"]).groups()
    )
    assert version >= required, (base, version, required)


def test_cuda_image_is_nvidias_runtime_with_the_gpu_extra():
    text = (DOCKER / "Dockerfile.cuda").read_text()
    assert re.search(r"^FROM nvidia/cuda:12\.[0-9.]+-runtime-", text, flags=re.M)
    assert 'pip install -e ".[gpu]"' in _run_steps("Dockerfile.cuda")[-2]
    # the CUDA major of the base matches the CuPy wheel of the [gpu] extra
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("cupy-cuda12x") for d in project["optional-dependencies"]["gpu"])


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_build_context_leaves_out_the_venv_and_git(dockerfile):
    ignore = (DOCKER / f"{dockerfile}.dockerignore").read_text().split()
    assert {".venv", ".git"} <= set(ignore)
    text = (DOCKER / dockerfile).read_text()
    assert "USER streamem" in text  # not root in the pods
    assert "MALLOC_ARENA_MAX=1 MALLOC_MMAP_THRESHOLD_=1073741824" in text
