import os
from pathlib import Path

import pytest

from retrain_uploader.config import ConfigError, Settings

CONTRACT = """
[api]
base_url = "https://developer-api.predictionone.sony.biz"  # endpoints are base_url + /v1/external/...

[ledger]
path = "/var/lib/retrain-uploader/ledger.sqlite3"

[watch]
settle_s = 5          # a file is taken once it has stopped changing for this long
force_polling = false # for NFS/SMB mounts where inotify sees nothing

[retry]
base_delay_s = 1
max_delay_s = 300

[[models]]
name = "churn"
inbox = "/srv/retrain/churn"
api_key_file = "/etc/retrain-uploader/keys/churn"  # or api_key_env = "VAR"; one API key per model
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_the_issue_contract_loads_as_written(tmp_path: Path) -> None:
    s = Settings.from_toml(write(tmp_path, CONTRACT))
    assert s.api.base_url == "https://developer-api.predictionone.sony.biz"
    assert s.ledger.path == Path("/var/lib/retrain-uploader/ledger.sqlite3")
    assert s.watch.settle_s == 5 and s.watch.force_polling is False
    assert (s.retry.base_delay_s, s.retry.max_delay_s) == (1, 300)
    assert s.models[0].name == "churn"
    assert s.models[0].inbox == Path("/srv/retrain/churn")
    assert s.models[0].api_key_file == Path("/etc/retrain-uploader/keys/churn")
    assert s.staging_dir == Path("/var/lib/retrain-uploader/staging")


def test_the_shipped_example_config_is_valid() -> None:
    example = Path(__file__).parent.parent / "config" / "config.example.toml"
    s = Settings.from_toml(example)
    assert len(s.models) >= 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[[models]]\nname='a'\ninbox='/x'\n", "models[0] (a): set exactly one of api_key_file"),
        ("[[models]]\nname='a'\ninbox='/x'\napi_key_env='K'\napi_key_file='/k'\n", "models[0] (a): set exactly one"),
        ("[watch]\nsettle_s=-1\n[[models]]\nname='a'\ninbox='/x'\napi_key_env='K'\n", "watch.settle_s"),
        ("[watch]\nsetle_s=1\n[[models]]\nname='a'\ninbox='/x'\napi_key_env='K'\n", "watch.setle_s: unknown key"),
        ("[api]\nbase_url='ftp://x'\n[[models]]\nname='a'\ninbox='/x'\napi_key_env='K'\n", "api.base_url: must start"),
        ("[retry]\nbase_delay_s=10\nmax_delay_s=1\n[[models]]\nname='a'\ninbox='/x'\napi_key_env='K'\n", "retry"),
        ("", "models: Field required"),
        ("[[models]]\nname='a'\ninbox='/x'\napi_keyfile='/k'\n", "models[0] (a).api_keyfile: unknown key"),
        ("[[models]]\nname='a b'\ninbox='/x'\napi_key_env='K'\n", "models[0] (a b).name"),
        (
            "[[models]]\nname='a'\ninbox='/x'\napi_key_env='K'\n[[models]]\nname='a'\ninbox='/y'\napi_key_env='K'\n",
            "model names must be unique",
        ),
        ("not toml [", "not valid TOML"),
    ],
)
def test_errors_name_the_file_and_the_key(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        Settings.from_toml(path)
    assert str(path) in str(info.value)
    assert expected in str(info.value)


def test_a_bad_model_gives_one_error_not_a_cascade(tmp_path: Path) -> None:
    path = write(tmp_path, "[[models]]\nname='a'\ninbox='/x'\napi_key_file='/k'\napi_key_env='K'\n")
    with pytest.raises(ConfigError) as info:
        Settings.from_toml(path)
    assert str(info.value).splitlines() == [
        f"{path}: models[0] (a): set exactly one of api_key_file, api_key_env, api_key_credential"
    ]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        Settings.from_toml(tmp_path / "nope.toml")


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    s = Settings.from_toml(write(tmp_path, "[ledger]\npath='state/l.db'\n[[models]]\nname='a'\ninbox='in/a'\n"
                                           "api_key_file='keys/a'\n"))
    assert s.ledger.path == tmp_path / "state/l.db"
    assert s.models[0].inbox == tmp_path / "in/a"
    assert s.models[0].api_key_file == tmp_path / "keys/a"


def test_key_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "k").write_text("  secret-key-1\n")
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "churn").write_text("secret-key-3")
    monkeypatch.setenv("KEY2", "secret-key-2")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "creds"))
    s = Settings.from_toml(write(tmp_path, (
        "[[models]]\nname='a'\ninbox='a'\napi_key_file='k'\n"
        "[[models]]\nname='b'\ninbox='b'\napi_key_env='KEY2'\n"
        "[[models]]\nname='c'\ninbox='c'\napi_key_credential='churn'\n"
    )))
    assert [m.read_api_key() for m in s.models] == ["secret-key-1", "secret-key-2", "secret-key-3"]


def test_key_source_errors_are_clear_and_do_not_echo_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "two").write_text("secret-one secret-two\n")
    monkeypatch.delenv("NOPE", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    s = Settings.from_toml(write(tmp_path, (
        "[[models]]\nname='a'\ninbox='a'\napi_key_file='missing'\n"
        "[[models]]\nname='b'\ninbox='b'\napi_key_file='empty'\n"
        "[[models]]\nname='c'\ninbox='c'\napi_key_env='NOPE'\n"
        "[[models]]\nname='d'\ninbox='d'\napi_key_credential='x'\n"
        "[[models]]\nname='e'\ninbox='e'\napi_key_file='two'\n"
    )))
    messages = []
    for m in s.models:
        with pytest.raises(ConfigError) as info:
            m.read_api_key()
        messages.append(str(info.value))
    assert "models.a.api_key_file: cannot read key file" in messages[0]
    assert "is empty" in messages[1]
    assert "models.c.api_key_env: environment variable NOPE is not set" in messages[2]
    assert "$CREDENTIALS_DIRECTORY is not set" in messages[3]
    assert "more than one token" in messages[4]
    assert not any("secret-" in m for m in messages)
    assert os.environ.get("NOPE") is None
