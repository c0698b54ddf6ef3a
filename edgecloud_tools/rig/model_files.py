"""Model files as a release ships them: a copy of a model whose card names another version, so the
fault suite and the fleet bench can publish one model as many releases."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def versioned_copy(model: Path, dest: Path, version: int) -> Path:
    """``model`` and its card at ``dest``, the card saying ``version``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model, dest)
    card = json.loads(Path(f"{model}.card.json").read_text())
    Path(f"{dest}.card.json").write_text(json.dumps({**card, "version": version}))
    return dest
