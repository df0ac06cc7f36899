"""Where each benchmarked system runs: a virtual environment holding what the system's own install puts there.

A process's start-up time and resident memory depend on what is installed beside it, not only on what it needs:
peft imports bitsandbytes whenever it is installed (1.6 s and ~130 MiB of resident memory on this CPU, in every
process that imports peft), and the development venv (`pip install -e '.[test]'`) has bitsandbytes, DeepSpeed,
wandb, gradio, llama-cpp and more. A user who runs `pip install -e .` (README) or `pip install trl` has none of
them, so the benchmarks run each system from a venv made by its own install command:

- tunesmith: bench/.venv-tunesmith — `pip install torch==<this torch>` then `pip install -e <this repository>`
  (editable: it runs the checkout being measured);
- TRL (bench/train_speed.py): bench/.venv-trl — torch, then `pip install trl==<this trl>`;
- ms-swift (and the TRL 0.29.1 that ms-swift pins, bench/grpo_speed.py): bench/.venv-swift, as before
  (train_speed.py --make-swift-venv).

The shared libraries (transformers, peft, accelerate, datasets, tokenizers, safetensors, huggingface_hub) are pinned
to the versions of the interpreter that creates the venvs, so tunesmith and TRL train with the same library code.
`python bench/train_speed.py --make-user-venvs` creates the two venvs (a few minutes; the package registry must be
reachable). Where a venv is missing, its system runs from this interpreter and the output says so.
"""
from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
VENVS = {"tunesmith": os.path.join(HERE, ".venv-tunesmith"), "trl": os.path.join(HERE, ".venv-trl")}
SHARED = ("transformers", "peft", "accelerate", "datasets", "tokenizers", "safetensors", "huggingface_hub")


def python_for(system: str) -> str:
    """The interpreter `system` ("tunesmith" or "trl") runs with: its venv's when that exists, else this one."""
    python = os.path.join(VENVS[system], "bin", "python")
    return python if os.path.exists(python) else sys.executable


def where(system: str) -> str:
    """One line for the output: which environment `system` ran from."""
    if python_for(system) == sys.executable:
        return (f"{system}: this interpreter ({sys.prefix}; whatever extras it has are imported too — "
                f"create bench/{os.path.basename(VENVS[system])} with --make-user-venvs)")
    return f"{system}: {os.path.relpath(VENVS[system], REPO)} (its own install only)"


def _pins() -> list[str]:
    pins = []
    for name in SHARED:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return pins


def make_user_venvs() -> None:
    """Create bench/.venv-tunesmith and bench/.venv-trl where missing (see the module docstring). Raises
    subprocess.CalledProcessError when pip fails (e.g. the registry is unreachable)."""
    torch = metadata.version("torch").split("+")[0]
    wants = {"tunesmith": ["-e", REPO], "trl": [f"trl=={metadata.version('trl')}"]}
    for system, packages in wants.items():
        venv = VENVS[system]
        if os.path.exists(os.path.join(venv, "bin", "python")):
            continue
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        pip = os.path.join(venv, "bin", "pip")
        subprocess.run([pip, "install", "-q", f"torch=={torch}"], check=True)
        subprocess.run([pip, "install", "-q", *packages, *_pins()], check=True)
