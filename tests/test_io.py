"""Atomic writes: the target appears whole or not at all, with ordinary permissions."""

from __future__ import annotations

import os

import pytest

from utils.io import atomic_path, write_json


def test_atomic_write_has_umask_permissions_and_no_leftovers(tmp_path):
    target = tmp_path / "a" / "result.json"
    write_json(target, {"x": 1})
    umask = os.umask(0)
    os.umask(umask)
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~umask)
    assert [p.name for p in target.parent.iterdir()] == ["result.json"]


def test_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "result.json"
    write_json(target, {"x": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text().strip().startswith("{") and '"x": 1' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]
