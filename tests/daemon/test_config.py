"""Node config: a valid file loads, and every refusal names the file and the key at fault."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pydantic
import pytest

from volkeeper.core.addresses import TcpAddress, UnixAddress
from volkeeper.daemon.config import NodeConfig, load_config, parse_config
from volkeeper.errors import ConfigError

NODE = """\
[node]
name = "alpha"
state_dir = "/var/lib/volkeeper/alpha"
listen = "127.0.0.1:7788"
control = "unix:/run/volkeeper/alpha.sock"
nbd = "unix:/run/volkeeper/alpha-nbd.sock"
"""

VOLUME = """
[[volume]]
name = "data1"
path = "/srv/volkeeper/data1.img"
"""


def refusal(text: str) -> str:
    """The message of the ConfigError that parsing ``text`` as alpha.toml raises."""
    with pytest.raises(ConfigError) as info:
        parse_config(text, "alpha.toml")
    message = str(info.value)
    assert all(line.startswith("alpha.toml: ") for line in message.splitlines()), message
    return message


def with_node_line(key: str, value: str) -> str:
    """NODE with ``key`` set to the TOML ``value`` (replacing it if present)."""
    lines = [line for line in NODE.splitlines() if not line.startswith(f"{key} =")]
    return "\n".join([*lines, f"{key} = {value}", ""])


def test_full_config(tmp_path: Path) -> None:
    bitmaps = tmp_path / "bitmaps"
    bitmaps.mkdir()
    path = tmp_path / "alpha.toml"
    path.write_text(
        with_node_line("bitmap_dir", f'"{bitmaps}"').replace(
            '"unix:/run/volkeeper/alpha-nbd.sock"', '"[::1]:10809"'
        )
        + 'log_level = "WARNING"\n'
        + '[peers]\nbeta = "127.0.0.1:7790"\n"gamma.dc2" = "[fd00::2]:7788"\n'
        + VOLUME
        + 'size = "1GiB"\nsector_size = 4096\n'
        + '[[volume]]\nname = "data2"\npath = "/dev/vdb"\nsize = 1048576\n'
    )
    config = load_config(path)
    assert config.node.name == "alpha"
    assert config.node.state_dir == Path("/var/lib/volkeeper/alpha")
    assert config.node.bitmap_dir == bitmaps
    assert config.node.listen == TcpAddress("127.0.0.1", 7788)
    assert config.node.control == UnixAddress("/run/volkeeper/alpha.sock")
    assert config.node.nbd == TcpAddress("::1", 10809)
    assert config.node.log_level == "warning"
    assert config.peers == {
        "beta": TcpAddress("127.0.0.1", 7790),
        "gamma.dc2": TcpAddress("fd00::2", 7788),
    }
    assert [(v.name, v.path, v.size, v.sector_size) for v in config.volumes] == [
        ("data1", Path("/srv/volkeeper/data1.img"), 1024**3, 4096),
        ("data2", Path("/dev/vdb"), 1048576, 512),
    ]


def test_minimal_config_gets_defaults() -> None:
    config = parse_config(NODE)
    assert config.node.bitmap_dir == Path("/var/lib/volkeeper/alpha/bitmaps")
    assert config.node.log_level == "info"
    assert config.peers == {}
    assert config.volumes == []


def test_volume_defaults() -> None:
    (volume,) = parse_config(NODE + VOLUME).volumes
    assert volume.sector_size == 512
    assert volume.size is None


def test_config_is_frozen() -> None:
    config = parse_config(NODE)
    with pytest.raises(pydantic.ValidationError):
        config.node.name = "beta"


def test_json_dump_round_trips_through_validation() -> None:
    """Addresses dump as the strings they were parsed from; unset defaults stay out."""
    config = parse_config(NODE + '[peers]\nbeta = "[::1]:7790"\n' + VOLUME + 'size = "4k"\n')
    dumped = config.model_dump(mode="json", by_alias=True, exclude_unset=True)
    assert dumped["node"]["control"] == "unix:/run/volkeeper/alpha.sock"
    assert dumped["peers"] == {"beta": "[::1]:7790"}
    assert dumped["volume"][0]["size"] == 4096
    assert NodeConfig.model_validate(dumped) == config


def test_invalid_toml_reports_position() -> None:
    message = refusal(NODE + "log_level = debug\n")
    assert re.fullmatch(r"alpha\.toml: line 7, column 13: invalid TOML: Invalid value", message)


def test_duplicate_toml_key_is_invalid_toml() -> None:
    assert "invalid TOML: Cannot overwrite a value" in refusal(NODE + 'name = "beta"\n')


def test_unknown_keys_are_refused_wherever_they_are() -> None:
    message = refusal(NODE + 'lisen = "x"\n' + VOLUME + "sise = 4\n" + "[volumes]\n")
    assert message.splitlines() == [
        "alpha.toml: unknown key node.lisen",
        "alpha.toml: unknown key volume[0].sise",
        "alpha.toml: unknown key volumes",
    ]


@pytest.mark.parametrize("key", ["name", "state_dir", "listen", "control", "nbd"])
def test_missing_required_node_key(key: str) -> None:
    text = "\n".join(line for line in NODE.splitlines() if not line.startswith(f"{key} ="))
    assert refusal(text) == f"alpha.toml: missing required key node.{key}"


def test_missing_node_table_and_volume_keys() -> None:
    assert refusal("") == "alpha.toml: missing required key node"
    assert refusal(NODE + "[[volume]]\nsize = 4096\n").splitlines() == [
        "alpha.toml: missing required key volume[0].name",
        "alpha.toml: missing required key volume[0].path",
    ]


@pytest.mark.parametrize(
    "name", ['""', '"-alpha"', '".hidden"', '"al pha"', '"a/b"', '"' + "a" * 64 + '"', '"é"', "7"]
)
def test_bad_node_name(name: str) -> None:
    assert refusal(with_node_line("name", name)).startswith("alpha.toml: node.name: expected ")


def test_longest_node_name_is_accepted() -> None:
    name = "a" + "_.-9" * 15 + "zz"
    assert parse_config(with_node_line("name", f'"{name}"')).node.name == name


def test_bad_peer_and_volume_names_name_their_key() -> None:
    message = refusal(
        NODE + '[peers]\n"be ta" = "127.0.0.1:1"\n' + VOLUME.replace("data1", "da/ta")
    )
    assert message.splitlines() == [
        'alpha.toml: peers."be ta": expected 1 to 63 letters, digits, "_", "." or "-", '
        'starting with a letter or digit, got "be ta"',
        'alpha.toml: volume[0].name: expected 1 to 63 letters, digits, "_", "." or "-", '
        'starting with a letter or digit, got "da/ta"',
    ]


def test_duplicate_volume_names_and_paths() -> None:
    data2 = VOLUME.replace("data1", "data2", 1)
    third = VOLUME.replace("data1.img", "other.img")
    message = refusal(NODE + VOLUME + data2 + third)
    assert message.splitlines() == [
        'alpha.toml: volume: name "data1" is declared twice (volume[0] and volume[2])',
        "alpha.toml: volume: path /srv/volkeeper/data1.img is used twice (volume[0] and volume[1])",
    ]


@pytest.mark.parametrize("value", ["1000", "0", "-512", '"512"', "true", "4095"])
def test_bad_sector_size(value: str) -> None:
    message = refusal(NODE + VOLUME + VOLUME.replace("data1", "data2") + f"sector_size = {value}\n")
    assert message == f"alpha.toml: volume[1].sector_size: must be 512 or 4096, got {value}"


def test_size_must_be_whole_sectors() -> None:
    message = refusal(
        NODE
        + VOLUME
        + 'size = "1M"\nsector_size = 4096\n'
        + VOLUME.replace("1", "2")
        + "size = 1000\n"
    )
    assert message == "alpha.toml: volume[1].size: 1000 bytes is not a multiple of sector_size 512"
    assert "not a multiple of sector_size 4096" in refusal(
        NODE + VOLUME + 'size = "6KB"\nsector_size = 4096\n'
    )


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ('"lots"', 'expected a size like 4096, "4KiB", "512 MiB" or "1G", got "lots"'),
        ("-4096", "must not be negative"),
        ("0", "must be larger than 0 bytes"),
        ("1.5", 'expected a number of bytes or a size like "1GiB", got 1.5'),
    ],
)
def test_bad_size(value: str, reason: str) -> None:
    message = refusal(NODE + VOLUME + f"size = {value}\n")
    assert message.startswith("alpha.toml: volume[0].size: ")
    assert reason in message


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("listen", '"7788"', 'node.listen: expected "host:port", got "7788": no port'),
        (
            "listen",
            '"unix:/run/x.sock"',
            'node.listen: expected "host:port", got "unix:/run/x.sock"',
        ),
        ("listen", '"127.0.0.1:0"', 'node.listen: expected "host:port", got "127.0.0.1:0"'),
        ("control", '"unix:run/x.sock"', 'node.control: expected "unix:/absolute/path"'),
        ("control", '""', 'node.control: expected "unix:/absolute/path" or "host:port", got ""'),
        ("nbd", '"::1:10809"', 'node.nbd: expected "[ipv6]:port"'),
        ("nbd", "10809", "node.nbd: expected a string, got 10809"),
    ],
)
def test_bad_node_addresses(key: str, value: str, reason: str) -> None:
    assert refusal(with_node_line(key, value)).startswith(f"alpha.toml: {reason}")


def test_bad_peer_address() -> None:
    message = refusal(NODE + '[peers]\nbeta = "beta"\ngamma = "unix:/run/gamma.sock"\n')
    assert message.splitlines() == [
        'alpha.toml: peers.beta: expected "host:port", got "beta": no port',
        'alpha.toml: peers.gamma: expected "host:port", got "unix:/run/gamma.sock": '
        "a unix socket is not accepted here",
    ]


def test_listeners_need_distinct_addresses() -> None:
    text = with_node_line("nbd", '"unix:/run/volkeeper/alpha.sock"')
    assert refusal(text) == (
        'alpha.toml: node: control and nbd are both "unix:/run/volkeeper/alpha.sock"; '
        "each listener needs its own address"
    )


def test_peer_named_like_the_node() -> None:
    message = refusal(NODE + '[peers]\nalpha = "127.0.0.1:7790"\n')
    assert message == (
        'alpha.toml: peers: "alpha" is this node\'s own name; list only the other nodes'
    )


def test_bitmap_dir_must_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    message = refusal(with_node_line("bitmap_dir", f'"{missing}"'))
    assert message == f"alpha.toml: node.bitmap_dir: directory {missing} does not exist"


def test_bitmap_dir_must_be_a_directory(tmp_path: Path) -> None:
    afile = tmp_path / "file"
    afile.write_text("")
    message = refusal(with_node_line("bitmap_dir", f'"{afile}"'))
    assert message == f"alpha.toml: node.bitmap_dir: {afile} is not a directory"


def test_paths_must_be_absolute() -> None:
    assert refusal(with_node_line("state_dir", '"var/lib"')) == (
        'alpha.toml: node.state_dir: expected an absolute path, got "var/lib"'
    )
    assert refusal(NODE + VOLUME.replace('"/srv', '"srv')).startswith(
        "alpha.toml: volume[0].path: expected an absolute path"
    )


def test_bad_log_level() -> None:
    assert refusal(with_node_line("log_level", '"verbose"')) == (
        'alpha.toml: node.log_level: must be one of debug, info, warning, error, got "verbose"'
    )


def test_wrong_table_types() -> None:
    assert refusal('node = "alpha"\npeers = 5\nvolume = 3\n').splitlines() == [
        'alpha.toml: node: expected a table, got "alpha"',
        "alpha.toml: peers: expected a table, got 5",
        "alpha.toml: volume: expected an array of tables, got 3",
    ]


def test_several_problems_one_line_each() -> None:
    text = with_node_line("name", '"-x"') + 'lisen = "x"\n' + VOLUME + "sector_size = 1\n"
    assert refusal(text).splitlines() == [
        'alpha.toml: node.name: expected 1 to 63 letters, digits, "_", "." or "-", '
        'starting with a letter or digit, got "-x"',
        "alpha.toml: unknown key node.lisen",
        "alpha.toml: volume[0].sector_size: must be 512 or 4096, got 1",
    ]


def test_nonexistent_file(tmp_path: Path) -> None:
    path = tmp_path / "alpha.toml"
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: config file does not exist$"):
        load_config(path)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file: Is a directory"):
        load_config(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of their mode")
def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "alpha.toml"
    path.write_text(NODE)
    path.chmod(0)
    with pytest.raises(ConfigError, match="cannot read config file: Permission denied"):
        load_config(str(path))


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "alpha.toml"
    path.write_bytes(NODE.encode() + b"# caf\xe9\n")
    with pytest.raises(
        ConfigError, match=r"alpha\.toml: not UTF-8 text \(bad byte at offset \d+\)"
    ):
        load_config(path)


def test_errors_in_file_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "alpha.toml"
    path.write_text(NODE + "sector_size = 512\n")
    with pytest.raises(
        ConfigError, match=f"^{re.escape(str(path))}: unknown key node.sector_size$"
    ):
        load_config(path)


def test_parse_config_default_source() -> None:
    with pytest.raises(ConfigError, match=r"^<config>: missing required key node$"):
        parse_config("")


# -- [tls] ---------------------------------------------------------------------------------


def tls_files(directory: Path) -> dict[str, Path]:
    """Three readable files standing in for the PEM files (their contents are peer_tls's)."""
    files = {key: directory / f"{key}.pem" for key in ("certificate", "key", "ca")}
    for path in files.values():
        path.write_text("PEM\n")
    return files


def tls_table(**values: object) -> str:
    lines = ["[tls]"] + [
        f'{key} = "{value}"' if isinstance(value, Path) else f"{key} = {value}"
        for key, value in values.items()
    ]
    return NODE + "\n".join(lines) + "\n"


def test_tls_table_is_optional() -> None:
    assert parse_config(NODE).tls is None


def test_tls_table(tmp_path: Path) -> None:
    files = tls_files(tmp_path)
    tls = parse_config(tls_table(**files)).tls
    assert tls is not None
    assert (tls.certificate, tls.key, tls.ca) == (files["certificate"], files["key"], files["ca"])


def test_tls_needs_all_three_files(tmp_path: Path) -> None:
    files = tls_files(tmp_path)
    del files["key"]
    assert refusal(tls_table(**files)) == "alpha.toml: missing required key tls.key"
    assert refusal(NODE + "[tls]\n").splitlines() == [
        f"alpha.toml: missing required key tls.{key}" for key in ("certificate", "key", "ca")
    ]


def test_tls_file_must_exist(tmp_path: Path) -> None:
    files = tls_files(tmp_path)
    files["certificate"] = tmp_path / "nope.pem"
    files["ca"] = tmp_path / "missing-dir" / "ca.pem"
    assert refusal(tls_table(**files)).splitlines() == [
        f"alpha.toml: tls.certificate: file {tmp_path / 'nope.pem'} does not exist",
        f"alpha.toml: tls.ca: file {tmp_path / 'missing-dir' / 'ca.pem'} does not exist",
    ]


def test_tls_file_must_be_a_regular_file(tmp_path: Path) -> None:
    files = tls_files(tmp_path)
    files["key"] = tmp_path
    assert refusal(tls_table(**files)) == f"alpha.toml: tls.key: {tmp_path} is not a regular file"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of their mode")
def test_tls_file_must_be_readable(tmp_path: Path) -> None:
    files = tls_files(tmp_path)
    files["key"].chmod(0)
    assert refusal(tls_table(**files)) == (
        f"alpha.toml: tls.key: cannot read {files['key']}: Permission denied"
    )


def test_tls_paths_must_be_absolute_strings(tmp_path: Path) -> None:
    files: dict[str, object] = dict(tls_files(tmp_path))
    files["certificate"] = '"certs/alpha.pem"'
    files["ca"] = 5
    assert refusal(tls_table(**files)).splitlines() == [
        'alpha.toml: tls.certificate: expected an absolute path, got "certs/alpha.pem"',
        "alpha.toml: tls.ca: expected a string, got 5",
    ]


def test_tls_unknown_key_and_wrong_type(tmp_path: Path) -> None:
    files: dict[str, object] = dict(tls_files(tmp_path))
    files["verify"] = "false"
    assert refusal(tls_table(**files)) == "alpha.toml: unknown key tls.verify"
    assert refusal('tls = "on"\n' + NODE) == 'alpha.toml: tls: expected a table, got "on"'
