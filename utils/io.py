"""Atomic file writing: a crash never leaves a half-written artifact or checkpoint behind."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from safetensors.torch import save_file


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; artifacts get the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a staging folder beside `path`; on success it replaces `path` (a folder) whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        yield staging
        if path.exists():
            shutil.rmtree(path)
        staging.rename(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_table(path: str | Path, rows: list[dict]) -> None:
    """Rows as CSV (columns: the union of the rows' keys, in first-seen order), written atomically."""
    import csv
    import io

    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows({k: json.dumps(list(v)) if isinstance(v, (list, tuple)) else v for k, v in row.items()}
                     for row in rows)  # a sweep value per slider reads [0, 2], as in metrics.json
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue())


def read_json(path: str | Path, error: type[Exception]) -> Any:
    """The content of a JSON file; `error` (a one-line project error) naming the file if it is not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path} is not valid JSON ({e.msg}, line {e.lineno}); fix or rewrite the file") from None


def read_info_beside(path: str | Path, name: str, required: tuple[str, ...] = ()) -> dict | None:
    """The JSON file `name` in a run folder, or beside an artifact file in it; None when there is none. It must be
    an object holding the `required` keys."""
    from utils.errors import ArtifactError

    path = Path(path)
    info = (path if path.is_dir() else path.parent) / name
    if not info.is_file():
        return None
    data = read_json(info, ArtifactError)
    missing = [k for k in required if k not in data] if isinstance(data, dict) else list(required)
    if not isinstance(data, dict) or missing:
        raise ArtifactError(f"{info} is not the {name} a run writes (no {missing[0] if missing else 'object'}); "
                            f"pass the run's own folder, or export the run again")
    return data


def check_safetensors(path: str | Path, key: str) -> None:
    """A safetensors file whose header reads (names and shapes; no tensor is loaded), else one ArtifactError."""
    from safetensors import safe_open

    from utils.errors import ArtifactError

    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ArtifactError(f"{key}={path} is not a readable safetensors file ({reason}); pass an intact file "
                            f"(export it again from its run)") from None


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that writes to a temporary file and renames it into place."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)
