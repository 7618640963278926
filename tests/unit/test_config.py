"""Settings that depend on the host: the default server-wide instance cap follows its memory."""

from __future__ import annotations

from pathlib import Path

from impuls import config


def _meminfo(tmp_path: Path, kib: int | None) -> Path:
    path = tmp_path / "meminfo"
    lines = ["MemFree:         1000 kB"] + ([f"MemTotal:       {kib} kB"] if kib is not None else [])
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_default_cap_is_one_instance_per_16_mib(tmp_path: Path) -> None:
    assert config.default_max_concurrency(_meminfo(tmp_path, 24 * 1024 * 1024)) == 1536
    assert config.default_max_concurrency(_meminfo(tmp_path, 2 * 1024 * 1024)) == 128


def test_small_or_unreadable_hosts_get_the_minimum(tmp_path: Path) -> None:
    assert config.default_max_concurrency(_meminfo(tmp_path, 512 * 1024)) == config.MIN_INSTANCES
    assert config.default_max_concurrency(_meminfo(tmp_path, None)) == config.MIN_INSTANCES
    assert config.default_max_concurrency(tmp_path / "missing") == config.MIN_INSTANCES


def test_settings_take_the_host_default_unless_set() -> None:
    assert config.load(environ={}).max_concurrency == config.default_max_concurrency()
    assert config.load(environ={"IMPULS_MAX_CONCURRENCY": "7"}).max_concurrency == 7
