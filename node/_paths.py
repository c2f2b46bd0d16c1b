"""Where a node keeps its state, and the files inside the data dir."""

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

ENV_HOME = "SALALA_HOME"


@dataclass(frozen=True)
class DataDir:
    root: Path

    @property
    def socket(self) -> Path:
        return self.root / "api.sock"

    @property
    def identity(self) -> Path:
        return self.root / "identity.key"

    @property
    def links(self) -> Path:
        """The direct links' key and certificate (see ``mesh.wire._certs``)."""
        return self.root / "links"

    @property
    def training(self) -> Path:
        """Checkpoints: this node's stages' own, and those it collected as a driver."""
        return self.root / "training"

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def undeployed(self) -> Path:
        """Undeploy markers this node honours and advertises, kept across restarts."""
        return self.root / "undeployed.json"

    @property
    def throughput_cache(self) -> Path:
        return self.root / "cache" / "throughput.json"


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> DataDir:
    """``--data-dir`` wins, then $SALALA_HOME, then the platform's user data dir."""
    if data_dir is not None:
        return DataDir(Path(data_dir).expanduser().resolve())
    if os.environ.get(ENV_HOME):
        return DataDir(Path(os.environ[ENV_HOME]).expanduser().resolve())
    return DataDir(Path(platformdirs.user_data_dir("salala")).resolve())
