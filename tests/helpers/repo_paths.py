"""Where the repository is, so no test depends on the working directory it is started from."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
