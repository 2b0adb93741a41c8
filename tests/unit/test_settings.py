from __future__ import annotations

from pathlib import Path

import pytest

from tailstream.cli import _settings, build_parser
from tailstream.kafka_io import kafka_python_options
from tailstream.settings import Secret, Settings


def test_env_vars_are_read_and_converted() -> None:
    s = Settings.from_env({"TAILSTREAM_PARTITIONS": "8", "TAILSTREAM_TAIL_SHARE": "0.5",
                           "TAILSTREAM_DATA_DIR": "/x", "TAILSTREAM_REDIS_URL": "redis://h:1",
                           "PATH": "/bin"})
    assert s.partitions == 8 and s.tail_share == 0.5 and s.data_dir == Path("/x")
    assert isinstance(s.redis_url, Secret) and s.redis_url.reveal() == "redis://h:1"


def test_unknown_or_unreadable_env_vars_are_errors() -> None:
    with pytest.raises(ValueError, match="unknown setting TAILSTREAM_PARTITION"):
        Settings.from_env({"TAILSTREAM_PARTITION": "8"})
    with pytest.raises(ValueError, match="cannot read 'many' as int"):
        Settings.from_env({"TAILSTREAM_PARTITIONS": "many"})


def test_secrets_never_show_in_repr_or_redacted_output() -> None:
    s = Settings().replace(kafka_sasl_password=Secret("hunter2"),
                           redis_url=Secret("redis://:hunter2@h:1"))
    assert "hunter2" not in repr(s)
    assert "hunter2" not in str(s.redacted())
    assert s.to_env()["TAILSTREAM_KAFKA_SASL_PASSWORD"] == "hunter2"  # for child processes
    assert Settings.from_env(s.to_env()) == s


def test_topics_get_the_prefix() -> None:
    s = Settings().replace(topic_prefix="shop1-")
    assert s.topic_for("click") == "shop1-clicks"
    assert s.topic_for("item") == "shop1-items"
    assert "shop1-events.dlq" in s.all_topics


def test_cli_flags_override_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAILSTREAM_PARTITIONS", "8")
    monkeypatch.setenv("TAILSTREAM_TOPIC_PREFIX", "env-")
    args = build_parser().parse_args(["recs", "u1", "--topic-prefix", "flag-"])
    s = _settings(args)
    assert s.partitions == 8 and s.topic_prefix == "flag-"


def test_sasl_options_pass_through() -> None:
    s = Settings().replace(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="PLAIN",
                           kafka_sasl_username="u", kafka_sasl_password=Secret("p"))
    opts = kafka_python_options(s)
    assert opts == {"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN",
                    "sasl_plain_username": "u", "sasl_plain_password": "p"}


@pytest.mark.parametrize("command", ["demo", "up", "worker", "subscribe", "recs", "produce"])
def test_every_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "TAILSTREAM_KAFKA_BOOTSTRAP" in out  # flags name their env var
