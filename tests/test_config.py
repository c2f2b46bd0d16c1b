"""Node settings: config.toml, the remembered mesh key, and their errors."""

import stat
from datetime import time
from pathlib import Path

import pytest
from salala.mesh import MeshKey
from salala.node import ConfigError
from salala.node._config import FileConfig, load_file_config, policy_from, resolve_mesh_key
from salala.node._paths import DataDir


@pytest.fixture
def data_dir(tmp_path: Path) -> DataDir:
    return DataDir(tmp_path)


def test_no_config_file_means_defaults(data_dir: DataDir) -> None:
    assert load_file_config(data_dir) == FileConfig()


def test_config_file_settings_are_read(data_dir: DataDir) -> None:
    key = MeshKey.generate()
    (data_dir.root / "config.toml").write_text(
        f'mesh_key = "{key}"\n'
        'listen = ["/ip4/0.0.0.0/tcp/4001"]\ninterfaces = ["wlan0"]\nmdns = false\n'
        "max_store_gb = 20\n"
    )
    config = load_file_config(data_dir)
    assert config.listen == ["/ip4/0.0.0.0/tcp/4001"] and config.interfaces == ["wlan0"]
    assert config.mdns is False and config.max_store_gb == 20.0
    assert resolve_mesh_key(data_dir, None, config.mesh_key) == key


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("mesh_kee = 'x'\n", "unknown setting 'mesh_kee'"),
        ("listen = '/ip4/0.0.0.0/tcp/1'\n", "'listen' must be a list of strings"),
        ("peers = [1, 2]\n", "'peers' must be a list of strings"),
        ("mdns = 'yes'\n", "'mdns' must be a bool"),
        ("max_store_gb = '5'\n", "'max_store_gb' must be a float"),
        ("max_store_gb = true\n", "'max_store_gb' must be a float"),
        ("max_store_gb = 0\n", "max_store_gb must be a positive number"),
        ("max_store_gb = -1.5\n", "max_store_gb must be a positive number"),
        ("this is not toml", "config.toml"),
        ("[policy]\nmin_battery = 20\n", r"\[policy\] 'min_battery' is unknown"),
        ("[policy]\nonly_while_charging = 1\n", "'only_while_charging' is unknown or of the wrong"),
        ("[policy]\nmax_cpu_percent = true\n", "'max_cpu_percent' is unknown or of the wrong"),
        ("[policy]\nmin_battery_percent = 140\n", "min battery must be 0-100%"),
        ("[policy]\nquiet_hours = '22-7'\n", "quiet hours must look like 22:00-07:00"),
        ("[policy]\nmax_cpu_percent = 0\n", "max CPU must be above 0%"),
    ],
)
def test_bad_config_files_name_the_setting(data_dir: DataDir, text: str, message: str) -> None:
    (data_dir.root / "config.toml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_file_config(data_dir)


def test_the_owners_policy_comes_from_its_table_and_flags_override_it(data_dir: DataDir) -> None:
    (data_dir.root / "config.toml").write_text(
        "[policy]\nonly_while_charging = true\nmin_battery_percent = 30\n"
        "quiet_hours = '22:00-07:30'\nmax_cpu_percent = 50\nmax_memory_mb = 2048\n"
    )
    settings = load_file_config(data_dir).policy
    policy = policy_from(settings)
    assert policy.only_while_charging and policy.min_battery_percent == 30
    assert policy.quiet_hours == (time(22, 0), time(7, 30))
    assert policy.threads(8) == 4 and policy.max_memory_mb == 2048
    flags = {"min_battery_percent": 0, "max_cpu_percent": None, "only_while_charging": False}
    overridden = policy_from(settings, flags)  # None: not given; 0 and False: given
    assert overridden.min_battery_percent == 0 and overridden.max_cpu_percent == 50
    assert overridden.only_while_charging is False


def test_a_node_without_a_key_starts_its_own_mesh_and_keeps_it(data_dir: DataDir) -> None:
    first = resolve_mesh_key(data_dir, None, None)
    assert resolve_mesh_key(data_dir, None, None) == first
    assert stat.S_IMODE((data_dir.root / "mesh.key").stat().st_mode) == 0o600


def test_a_given_key_is_remembered(data_dir: DataDir) -> None:
    resolve_mesh_key(data_dir, None, None)
    joined = MeshKey.generate()
    assert resolve_mesh_key(data_dir, str(joined), None) == joined
    assert resolve_mesh_key(data_dir, None, None) == joined


def test_a_malformed_key_is_a_config_error(data_dir: DataDir) -> None:
    with pytest.raises(ConfigError, match="mesh key"):
        resolve_mesh_key(data_dir, "password123", None)
