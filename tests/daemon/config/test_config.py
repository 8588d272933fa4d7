"""Node config: a valid file loads, and every refusal names the file and the key at fault.

Also the compression setting parser (core/compression_setting.py), which jobs declared in
the config share with the control API.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pydantic
import pytest

from volkeeper.core import compression_setting
from volkeeper.core.addresses import TcpAddress, UnixAddress
from volkeeper.core.compression_setting import parse_compression
from volkeeper.daemon.config.node import NodeConfig, load_config, parse_config
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
        + "peer_timeout = 2.5\n"
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
    assert config.node.peer_timeout == 2.5
    assert config.peer_addresses == {
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
    assert config.node.peer_timeout == 10
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
    assert dumped["peers"] == {"beta": {"address": "[::1]:7790"}}
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
        'alpha.toml: peers.beta.address: expected "host:port", got "beta": no port',
        'alpha.toml: peers.gamma.address: expected "host:port", got "unix:/run/gamma.sock": '
        "a unix socket is not accepted here",
    ]


def test_peer_tables_pin_or_go_insecure() -> None:
    pin = "sha256:" + "ab" * 32
    config = parse_config(
        NODE + "[peers]\n"
        + f'beta = {{ address = "127.0.0.1:7790", fingerprint = "{pin.upper()}" }}\n'
        + 'gamma = { address = "127.0.0.1:7791", insecure = true }\n'
    )  # fmt: skip
    assert config.peers["beta"].fingerprint == pin  # canonical: lower case
    assert config.peers["gamma"].insecure and config.peers["gamma"].fingerprint is None
    assert config.peer_addresses["gamma"] == TcpAddress("127.0.0.1", 7791)


def test_bad_peer_tables() -> None:
    message = refusal(
        NODE + "[peers]\n"
        + 'beta = { address = "127.0.0.1:7790", fingerprint = "md5:00" }\n'
        + 'gamma = { address = "127.0.0.1:7791", insecure = true, fingerprint = "'
        + "sha256:" + "0" * 64 + '" }\n'
        + 'delta = { address = "127.0.0.1:7792", insecure = "yes" }\n'
        + 'eps = { adress = "127.0.0.1:7793" }\n'
        + "zeta = 7794\n"
    )  # fmt: skip
    assert message.splitlines() == [
        'alpha.toml: peers.beta.fingerprint: a fingerprint is "sha256:" and 64 hex digits '
        "(volkeeper node show prints it), got 'md5:00'",
        "alpha.toml: peers.gamma: insecure = true turns authentication off: drop it, or drop "
        "the fingerprint",
        'alpha.toml: peers.delta.insecure: expected true or false, got "yes"',
        "alpha.toml: missing required key peers.eps.address",
        "alpha.toml: unknown key peers.eps.adress",
        'alpha.toml: peers.zeta: expected "host:port" or a table { address = "host:port", '
        'fingerprint = "sha256:..." }, got 7794',
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


def test_io_uring_is_on_unless_turned_off_with_a_real_boolean() -> None:
    assert parse_config(NODE).node.io_uring is True
    assert parse_config(with_node_line("io_uring", "false")).node.io_uring is False
    problem = refusal(with_node_line("io_uring", '"no"'))
    assert problem.startswith("alpha.toml: node.io_uring: ") and "no" in problem


def test_bad_log_level() -> None:
    assert refusal(with_node_line("log_level", '"verbose"')) == (
        'alpha.toml: node.log_level: must be one of debug, info, warning, error, got "verbose"'
    )


@pytest.mark.parametrize(("value", "seconds"), [("1", 1.0), ("600", 600.0), ("0.5e1", 5.0)])
def test_peer_timeout_takes_whole_or_fractional_seconds(value: str, seconds: float) -> None:
    timeout = parse_config(with_node_line("peer_timeout", value)).node.peer_timeout
    assert (timeout, type(timeout)) == (seconds, float)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("0", "must be from 1 to 600 seconds, got 0"),
        ("0.999", "must be from 1 to 600 seconds, got 0.999"),
        ("601", "must be from 1 to 600 seconds, got 601"),
        ("-5", "must be from 1 to 600 seconds, got -5"),
        ("inf", "must be from 1 to 600 seconds, got inf"),
        ("nan", "must be from 1 to 600 seconds, got nan"),
        ('"10s"', 'expected a number of seconds, got "10s"'),
        ("true", "expected a number of seconds, got true"),
    ],
)
def test_bad_peer_timeout(value: str, reason: str) -> None:
    assert refusal(with_node_line("peer_timeout", value)) == (
        f"alpha.toml: node.peer_timeout: {reason}"
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


# -- [[job]] -------------------------------------------------------------------------------

PEERS = '[peers]\nbeta = "127.0.0.1:7790"\ngamma = "127.0.0.1:7792"\n'
VOLUMES = VOLUME + VOLUME.replace("data1", "data2")


def mirror(source: str, target: str, **settings: str) -> str:
    """One [[job.mirror]] table; ``settings`` are TOML values."""
    lines = [f'source = "{source}"', f'target = "{target}"']
    lines += [f"{key} = {value}" for key, value in settings.items()]
    return "[[job.mirror]]\n" + "\n".join(lines) + "\n"


def job(name: str, *mirrors: str, description: str | None = None) -> str:
    header = f'\n[[job]]\nname = "{name}"\n'
    if description is not None:
        header += f"description = {description}\n"
    return header + "".join(mirrors)


def with_jobs(*jobs: str, head: str = NODE + PEERS + VOLUMES) -> str:
    """alpha, with peers beta and gamma, volumes data1 and data2, and ``jobs``."""
    return head + "".join(jobs)


def test_jobs_full_example() -> None:
    config = parse_config(
        with_jobs(
            job(
                "web",
                mirror("alpha:data1", "beta:data1"),
                mirror(
                    "alpha:data1",
                    "gamma:web-copy",
                    mode='"async"',
                    queue_limit='"128MiB"',
                    region_size='"64KiB"',
                    compression='"zstd:3"',
                    throttle='"100MiB"',
                ),
                description='"web server data"',
            ),
            job(
                "db",
                mirror(
                    "alpha:data2",
                    "beta:db",
                    mode='"sync"',
                    queue_limit="1048576",
                    region_size="1048576",
                    compression='"lz4"',
                    throttle='"10MiB/s"',
                ),
            ),
        )
    )
    web, db = config.jobs
    assert (web.name, web.description, web.source_node) == ("web", "web server data", "alpha")
    sync, asynchronous = web.mirrors
    assert (sync.source, sync.target, sync.mode) == ("alpha:data1", "beta:data1", "sync")
    assert (sync.source_node, sync.source_volume) == ("alpha", "data1")
    assert (sync.target_node, sync.target_volume) == ("beta", "data1")
    assert (asynchronous.target_node, asynchronous.target_volume) == ("gamma", "web-copy")
    assert asynchronous.mode == "async"
    assert asynchronous.queue_limit == 128 * 1024**2
    assert asynchronous.region_size == 64 * 1024
    assert asynchronous.compression == "zstd:3"
    assert asynchronous.throttle == 100 * 1024**2
    assert (db.name, db.description, db.source_node) == ("db", "", "alpha")
    (only,) = db.mirrors
    assert (only.source, only.target, only.mode) == ("alpha:data2", "beta:db", "sync")
    assert (only.queue_limit, only.region_size) == (1024**2, 1024**2)
    assert (only.compression, only.throttle) == ("lz4", 10 * 1024**2)


def test_job_and_mirror_defaults() -> None:
    assert parse_config(NODE).jobs == []
    (web,) = parse_config(with_jobs(job("web", mirror("alpha:data1", "beta:data1")))).jobs
    assert web.description == ""
    (only,) = web.mirrors
    assert only.mode == "sync"
    assert only.queue_limit == 64 * 1024 * 1024
    assert only.region_size == 4096
    assert only.compression == "none"
    assert only.throttle is None


def test_mirror_settings_are_normalised() -> None:
    (web,) = parse_config(
        with_jobs(
            job(
                "web", mirror("alpha:data1", "beta:data1", mode='"ASYNC"', compression='" Zstd:07"')
            )
        )
    ).jobs
    assert (web.mirrors[0].mode, web.mirrors[0].compression) == ("async", "zstd:7")


def test_jobs_json_dump_round_trips_through_validation() -> None:
    config = parse_config(
        with_jobs(
            job("web", mirror("alpha:data1", "beta:data1", throttle='"1M"'), description='"x"')
        )
    )
    dumped = config.model_dump(mode="json", by_alias=True, exclude_unset=True)
    assert dumped["job"] == [
        {
            "name": "web",
            "description": "x",
            "mirror": [{"source": "alpha:data1", "target": "beta:data1", "throttle": 1048576}],
        }
    ]
    assert NodeConfig.model_validate(dumped) == config


def test_jobs_of_other_nodes_and_to_this_node_are_accepted() -> None:
    """One shared jobs list fits every node: alpha checks only what involves alpha."""
    config = parse_config(
        with_jobs(
            job("web", mirror("alpha:data1", "beta:data1")),
            job("logs", mirror("beta:logs", "alpha:data2"), mirror("beta:logs", "gamma:logs")),
            job("mail", mirror("delta:mail", "epsilon:mail")),  # neither node is a peer
        )
    )
    assert [(j.name, j.source_node) for j in config.jobs] == [
        ("web", "alpha"),
        ("logs", "beta"),
        ("mail", "delta"),
    ]
    assert config.jobs[2].mirrors[0].target == "epsilon:mail"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ('"alpha"', 'expected NODE:VOLUME like "alpha:data1", got "alpha"'),
        ('""', 'expected NODE:VOLUME like "alpha:data1", got ""'),
        (
            '":data1"',
            'expected NODE:VOLUME like "alpha:data1", got ":data1": the node name must be '
            '1 to 63 letters, digits, "_", "." or "-", starting with a letter or digit',
        ),
        (
            '"alpha:"',
            'expected NODE:VOLUME like "alpha:data1", got "alpha:": the volume name must be '
            '1 to 63 letters, digits, "_", "." or "-", starting with a letter or digit',
        ),
        ('"alpha:da:ta"', 'got "alpha:da:ta": the volume name must be 1 to 63 letters'),
        ('"al pha:data1"', 'got "al pha:data1": the node name must be 1 to 63 letters'),
        ("5", "expected a string, got 5"),
    ],
)
def test_bad_volume_reference(value: str, reason: str) -> None:
    text = with_jobs(job("web", mirror("alpha:data1", "beta:data1")))
    for key in ("source", "target"):
        line = f'{key} = "{"alpha:data1" if key == "source" else "beta:data1"}"'
        message = refusal(text.replace(line, f"{key} = {value}"))
        assert message.startswith(f"alpha.toml: job[0].mirror[0].{key}: expected ")
        assert message.endswith(reason) if reason.startswith("expected") else reason in message
        assert "\n" not in message


def test_mirror_target_on_the_source_node() -> None:
    text = with_jobs(job("web", mirror("alpha:data1", "beta:data1"), mirror("beta:x", "beta:y")))
    # mirror[1] also starts from another node than mirror[0]; a job whose mirrors failed
    # their own checks is not checked as a whole, so only the first problem is reported.
    assert refusal(text) == (
        "alpha.toml: job[0].mirror[1].target: beta:y is on the source's node beta; "
        "a mirror's target is on another node"
    )


def test_mirrors_of_a_job_start_from_one_node() -> None:
    text = with_jobs(
        job(
            "web",
            mirror("alpha:data1", "beta:data1"),
            mirror("gamma:data1", "beta:data2"),
            mirror("alpha:data2", "gamma:data2"),
        )
    )
    assert refusal(text) == (
        "alpha.toml: job[0].mirror[1].source: a job's mirrors all start from one node; "
        "mirror[1] starts from gamma, mirror[0] from alpha"
    )


def test_no_target_twice_in_a_job() -> None:
    text = with_jobs(
        job("web", mirror("alpha:data1", "beta:data1"), mirror("alpha:data2", "beta:data1"))
    )
    assert refusal(text) == (
        "alpha.toml: job[0].mirror[1].target: beta:data1 is already the target of mirror[0]"
    )


def test_a_job_needs_a_mirror() -> None:
    assert refusal(with_jobs(job("web"))) == "alpha.toml: missing required key job[0].mirror"
    assert refusal(with_jobs(job("web") + "mirror = []\n")) == (
        "alpha.toml: job[0].mirror: a job needs at least one [[job.mirror]]"
    )


def test_job_structure_errors() -> None:
    assert refusal("job = 3\n" + NODE) == ("alpha.toml: job: expected an array of tables, got 3")
    assert refusal(with_jobs('[job]\nname = "web"\n')) == (
        "alpha.toml: job: expected an array of tables, got a table"
    )
    text = with_jobs(job("web", mirror("alpha:data1", "beta:data1", speed="1")) + "owner = 'me'\n")
    assert refusal(text).splitlines() == [
        "alpha.toml: unknown key job[0].mirror[0].speed",
        "alpha.toml: unknown key job[0].mirror[0].owner",
    ]
    text = with_jobs(
        '\n[[job]]\nname = "web"\nmirrors = []\n[[job.mirror]]\nsource = "alpha:data1"\n'
    )
    assert refusal(text).splitlines() == [
        "alpha.toml: missing required key job[0].mirror[0].target",
        "alpha.toml: unknown key job[0].mirrors",
    ]


def test_bad_job_name_and_description() -> None:
    text = with_jobs(job("we b", mirror("alpha:data1", "beta:data1"), description="5"))
    assert refusal(text).splitlines() == [
        'alpha.toml: job[0].name: expected 1 to 63 letters, digits, "_", "." or "-", '
        'starting with a letter or digit, got "we b"',
        "alpha.toml: job[0].description: expected a string, got 5",
    ]
    long = '"' + "x" * 1025 + '"'
    text = with_jobs(job("web", mirror("alpha:data1", "beta:data1"), description=long))
    assert refusal(text) == (
        "alpha.toml: job[0].description: must be at most 1024 characters, got 1025"
    )


def test_job_names_are_unique() -> None:
    text = with_jobs(
        job("web", mirror("alpha:data1", "beta:data1")),
        job("db", mirror("alpha:data2", "beta:data2")),
        job("web", mirror("gamma:x", "beta:x")),
    )
    assert (
        refusal(text) == 'alpha.toml: job[2].name: job "web" is declared twice (job[0] and job[2])'
    )


def test_a_volume_is_the_target_of_one_mirror() -> None:
    text = with_jobs(
        job("web", mirror("alpha:data1", "beta:data1")),
        job("db", mirror("gamma:db", "beta:data1")),
    )
    assert refusal(text) == (
        "alpha.toml: job[1].mirror[0].target: beta:data1 is already the target of "
        "job[0].mirror[0]; a volume is the target of one mirror at most"
    )


@pytest.mark.parametrize("target_first", [True, False])
def test_a_volume_is_not_both_source_and_target(target_first: bool) -> None:
    jobs = [
        job("web", mirror("alpha:data1", "beta:data1")),
        job("cascade", mirror("beta:data1", "gamma:data1")),
    ]
    index, other = (1, 0) if target_first else (0, 1)
    text = with_jobs(*(jobs if target_first else jobs[::-1]))
    assert refusal(text) == (
        f"alpha.toml: job[{index}].mirror[0].source: beta:data1 is the target of "
        f"job[{other}].mirror[0]; a volume cannot be both a source and a target"
    )


def test_a_source_volume_belongs_to_one_job() -> None:
    text = with_jobs(
        job("web", mirror("alpha:data1", "beta:data1")),
        job("web2", mirror("alpha:data1", "gamma:data1")),
    )
    assert refusal(text) == (
        "alpha.toml: job[1].mirror[0].source: alpha:data1 is already the source of "
        "job[0].mirror[0]; all mirrors of a volume belong to one job"
    )


def test_a_source_here_needs_its_volume_and_a_peer() -> None:
    text = with_jobs(
        job("web", mirror("alpha:data1", "beta:data1"), mirror("alpha:data9", "delta:x"))
    )
    assert refusal(text).splitlines() == [
        'alpha.toml: job[0].mirror[1].source: this node (alpha) has no [[volume]] named "data9"',
        'alpha.toml: job[0].mirror[1].target: node "delta" is not in [peers] (known: beta, gamma)',
    ]
    text = with_jobs(job("web", mirror("alpha:data1", "beta:data1")), head=NODE + VOLUME)
    assert refusal(text) == (
        'alpha.toml: job[0].mirror[0].target: node "beta" is not in [peers] (known: none)'
    )


def test_a_target_here_needs_a_writable_volume() -> None:
    text = with_jobs(
        job("logs", mirror("beta:logs", "alpha:logs")),
        job("db", mirror("beta:db", "alpha:data2")),
        head=NODE + PEERS + VOLUME + VOLUME.replace("data1", "data2") + "read_only = true\n",
    )
    assert refusal(text).splitlines() == [
        'alpha.toml: job[0].mirror[0].target: this node (alpha) has no [[volume]] named "logs"',
        'alpha.toml: job[1].mirror[0].target: volume "data2" is read_only; '
        "a mirror's target must be writable",
    ]


def test_local_checks_wait_for_valid_volumes_and_peers() -> None:
    """A failed [[volume]] or [peers] is reported once, not again as a missing one per job."""
    head = NODE + '[peers]\nbeta = "beta"\n' + VOLUME + "sector_size = 1\n"
    text = with_jobs(job("web", mirror("alpha:data1", "beta:data1")), head=head)
    assert refusal(text).splitlines() == [
        'alpha.toml: peers.beta.address: expected "host:port", got "beta": no port',
        "alpha.toml: volume[0].sector_size: must be 512 or 4096, got 1",
    ]


def test_job_problems_come_in_file_order() -> None:
    text = with_jobs(
        job("web", mirror("alpha:data1", "beta:data1"), mirror("alpha:nope", "delta:data1")),
        job("web", mirror("gamma:x", "beta:data1")),
    )
    assert refusal(text).splitlines() == [
        'alpha.toml: job[0].mirror[1].source: this node (alpha) has no [[volume]] named "nope"',
        'alpha.toml: job[0].mirror[1].target: node "delta" is not in [peers] (known: beta, gamma)',
        'alpha.toml: job[1].name: job "web" is declared twice (job[0] and job[1])',
        "alpha.toml: job[1].mirror[0].target: beta:data1 is already the target of "
        "job[0].mirror[0]; a volume is the target of one mirror at most",
    ]


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("mode", '"fast"', 'must be "sync" or "async", got "fast"'),
        ("mode", "true", "expected a string, got true"),
        ("queue_limit", '"512KiB"', "must be at least 1 MiB (1048576 bytes), got 524288"),
        ("queue_limit", "1048575", "must be at least 1 MiB (1048576 bytes), got 1048575"),
        ("queue_limit", "0", "must be larger than 0 bytes"),
        ("queue_limit", "1.5", 'expected a number of bytes or a size like "1GiB", got 1.5'),
        ("queue_limit", "true", 'expected a number of bytes or a size like "1GiB", got true'),
        ("region_size", '"2KiB"', "must be a power of two from 4 KiB to 1 MiB, got 2048"),
        ("region_size", '"6KiB"', "must be a power of two from 4 KiB to 1 MiB, got 6144"),
        ("region_size", '"2MiB"', "must be a power of two from 4 KiB to 1 MiB, got 2097152"),
        ("region_size", '"big"', 'expected a size like 4096, "4KiB", "512 MiB" or "1G", got "big"'),
        ("compression", "5", "expected a string, got 5"),
        (
            "compression",
            '"gzip"',
            'expected "none", "lz4", "zlib:1".."zlib:9" or "zstd:1".."zstd:19", got "gzip"',
        ),
        ("compression", '"zlib:0"', 'got "zlib:0": the zlib level must be from 1 to 9'),
        (
            "throttle",
            "0",
            'expected a rate like 1048576, "100MiB/s" or "10M", got 0: a rate must be positive',
        ),
        ("throttle", '"-1M"', 'got "-1M": must not be negative'),
        ("throttle", '"fast"', 'expected a rate like 1048576, "100MiB/s" or "10M", got "fast"'),
        ("throttle", "false", 'expected bytes per second or a rate like "100MiB/s", got false'),
        ("throttle", "2.5", 'expected bytes per second or a rate like "100MiB/s", got 2.5'),
    ],
)
def test_bad_mirror_setting(key: str, value: str, reason: str) -> None:
    good = mirror("alpha:data1", "beta:data1")
    bad = mirror("alpha:data2", "beta:data2", **{key: value})
    message = refusal(with_jobs(job("web", good, bad)))
    assert message.startswith(f"alpha.toml: job[0].mirror[1].{key}: ")
    assert message.endswith(reason)
    assert "\n" not in message


# -- the compression setting (shared with the control API) ---------------------------------

VALID_COMPRESSIONS = [
    "none",
    "lz4",
    *(f"zlib:{level}" for level in range(1, 10)),
    *(f"zstd:{level}" for level in range(1, 20)),
]


@pytest.mark.parametrize("setting", VALID_COMPRESSIONS)
def test_every_valid_compression_setting(setting: str) -> None:
    assert parse_compression(setting) == setting


@pytest.mark.parametrize(
    ("text", "normalised"),
    [("NONE", "none"), (" LZ4 ", "lz4"), ("Zlib:9", "zlib:9"), ("zstd:007", "zstd:7")],
)
def test_compression_setting_is_normalised(text: str, normalised: str) -> None:
    assert parse_compression(text) == normalised


ALLOWED = 'expected "none", "lz4", "zlib:1".."zlib:9" or "zstd:1".."zstd:19"'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("zlib:0", f'{ALLOWED}, got "zlib:0": the zlib level must be from 1 to 9'),
        ("zlib:10", f'{ALLOWED}, got "zlib:10": the zlib level must be from 1 to 9'),
        ("zstd:0", f'{ALLOWED}, got "zstd:0": the zstd level must be from 1 to 19'),
        ("zstd:20", f'{ALLOWED}, got "zstd:20": the zstd level must be from 1 to 19'),
        ("zstd:-1", f'{ALLOWED}, got "zstd:-1": the zstd level must be from 1 to 19'),
        ("zstd:", f'{ALLOWED}, got "zstd:": the zstd level must be from 1 to 19'),
        ("zlib:1.5", f'{ALLOWED}, got "zlib:1.5": the zlib level must be from 1 to 9'),
        ("zstd:99999", f'{ALLOWED}, got "zstd:99999": the zstd level must be from 1 to 19'),
        ("zlib", f'{ALLOWED}, got "zlib": zlib needs a level, like zlib:1'),
        ("lz4:3", f'{ALLOWED}, got "lz4:3": lz4 takes no level'),
        ("none:1", f'{ALLOWED}, got "none:1": none takes no level'),
        ("gzip", f'{ALLOWED}, got "gzip"'),
        ("", f'{ALLOWED}, got ""'),
        ("zstd 3", f'{ALLOWED}, got "zstd 3"'),
    ],
)
def test_bad_compression_setting(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_compression(text)
    assert str(info.value) == message


def test_compression_setting_of_the_wrong_type() -> None:
    with pytest.raises(ValueError, match=r'expected "none", .* got 3$'):
        parse_compression(3)  # type: ignore[arg-type]


def test_compression_setting_is_sans_io() -> None:
    """The control API imports it too: it stays in the core, free of I/O modules."""
    tree = ast.parse(Path(compression_setting.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert not imported & {"os", "socket", "asyncio", "time", "pydantic"}
