"""The suite's own set-up (tests/conftest.py): where tmp_path folders go."""

from __future__ import annotations

import os
import shutil
from collections import namedtuple
from pathlib import Path

from conftest import memory_temproot

Usage = namedtuple("Usage", "total used free")


def test_test_folders_go_to_a_memory_filesystem_only_with_room_and_no_choice_made(tmp_path, monkeypatch):
    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setattr(os, "sysconf", lambda name: {"SC_PHYS_PAGES": 6 << 20, "SC_PAGE_SIZE": 4096}[name])  # 24 GiB
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(24 << 30, 0, 24 << 30))
    assert memory_temproot(shm, {}) == str(shm)
    assert memory_temproot(shm, {"PYTEST_DEBUG_TEMPROOT": "/elsewhere"}) is None  # a choice already made
    assert memory_temproot(tmp_path / "none", {}) is None
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(64 << 20, 0, 64 << 20))  # a container's 64 MB
    assert memory_temproot(shm, {}) is None
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(24 << 30, 0, 24 << 30))
    monkeypatch.setattr(os, "sysconf", lambda name: {"SC_PHYS_PAGES": 4 << 20, "SC_PAGE_SIZE": 4096}[name])  # 16 GiB
    assert memory_temproot(shm, {}) is None


def test_this_sessions_test_folders_are_where_the_set_up_chose(tmp_path):
    root = os.environ.get("PYTEST_DEBUG_TEMPROOT")
    if root is not None:
        assert Path(root) in tmp_path.resolve().parents
