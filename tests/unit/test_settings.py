"""Settings: MQKIT_* environment, fail-over URLs, validation errors, masking, overrides."""

from __future__ import annotations

import os

import pytest

from mqkit.errors import ConfigError, MqkitError
from mqkit.settings import Settings, mask_url

SECRET = "s3cret-pw"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No MQKIT_* variable from the outside world (MQKIT_TEST_URL, a developer's shell)
    may change what these tests see."""
    for name in list(os.environ):
        if name.upper().startswith("MQKIT_"):
            monkeypatch.delenv(name)


def test_defaults_match_the_api() -> None:
    settings = Settings()
    assert settings.url == "amqp://guest:guest@localhost:5672/"
    assert settings.urls == []
    assert settings.service == "mqkit"
    assert settings.queue_type == "quorum"
    assert settings.events_exchange == "mqkit.events"
    assert settings.prefetch >= 1
    assert settings.confirm_timeout > 0
    assert settings.connect_timeout > 0
    assert settings.ca_file is None and settings.cert_file is None and settings.key_file is None
    assert settings.all_urls == ["amqp://guest:guest@localhost:5672/"]


def test_environment_variables_with_mqkit_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MQKIT_SERVICE", "billing")
    monkeypatch.setenv("MQKIT_PREFETCH", "5")
    monkeypatch.setenv("MQKIT_CONFIRM_TIMEOUT", "2.5")
    monkeypatch.setenv("MQKIT_QUEUE_TYPE", "classic")
    monkeypatch.setenv("MQKIT_URL", "amqp://app:pw@rabbit:5672/prod")
    settings = Settings()
    assert settings.service == "billing"
    assert settings.prefetch == 5
    assert settings.confirm_timeout == 2.5
    assert settings.queue_type == "classic"
    assert settings.all_urls == ["amqp://app:pw@rabbit:5672/prod"]


def test_keyword_beats_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MQKIT_SERVICE", "from-env")
    assert Settings(service="from-code").service == "from-code"


def test_urls_from_environment_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MQKIT_URLS", "amqp://a:pa@node1:5672/, amqp://b:pb@node2:5673/v ,")
    settings = Settings()
    assert settings.urls == ["amqp://a:pa@node1:5672/", "amqp://b:pb@node2:5673/v"]
    assert settings.all_urls == settings.urls


def test_urls_override_url_and_url_may_be_a_list() -> None:
    both = Settings(url="amqp://x@one/", urls=["amqp://y@two/", "amqp://z@three/"])
    assert both.all_urls == ["amqp://y@two/", "amqp://z@three/"]
    listed = Settings(url="amqp://x@one/, amqp://x@two/")
    assert listed.all_urls == ["amqp://x@one/", "amqp://x@two/"]


def test_urls_given_as_a_string_keyword_are_split() -> None:
    assert Settings(urls="amqp://a@h1/,amqp://b@h2/").urls == ["amqp://a@h1/", "amqp://b@h2/"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("prefetch", 0),
        ("prefetch", "many"),
        ("confirm_timeout", 0),
        ("connect_timeout", -1),
        ("heartbeat", -5),
        ("queue_type", "stream-ish"),
        ("service", ""),
        ("events_exchange", ""),
        ("delivery_limit", 0),
        ("url", "http://localhost:5672/"),
        ("url", "amqp://"),
        ("urls", ["amqp://ok@host/", "redis://nope/"]),
    ],
)
def test_invalid_value_raises_config_error_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        Settings(**{field: value})
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, MqkitError)
    assert field in str(info.value)


def test_invalid_environment_value_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MQKIT_PREFETCH", "lots")
    with pytest.raises(ConfigError, match="prefetch"):
        Settings()


def test_invalid_port_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="port"):
        Settings(url="amqp://guest:guest@localhost:notaport/")


def test_cert_without_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="key_file"):
        Settings(url="amqps://h/", cert_file="/tmp/cert.pem")
    ok = Settings(url="amqps://h/", cert_file="/tmp/c.pem", key_file="/tmp/k.pem", ca_file="/ca")
    assert (ok.cert_file, ok.key_file, ok.ca_file) == ("/tmp/c.pem", "/tmp/k.pem", "/ca")


def test_unknown_keyword_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="prefech"):
        Settings(prefech=3)


def test_repr_and_str_never_show_the_password() -> None:
    settings = Settings(
        url=f"amqp://app:{SECRET}@rabbit:5672/",
        urls=[f"amqp://app:{SECRET}@node1/", f"amqp://app:{SECRET}2@node2/"],
    )
    for text in (repr(settings), str(settings)):
        assert SECRET not in text
        assert "rabbit" in text and "node1" in text and "node2" in text
        assert "***" in text
    # The values themselves are intact: only their display is masked.
    assert SECRET in settings.url


@pytest.mark.parametrize(
    "url",
    [
        f"http://app:{SECRET}@rabbit/",
        f"amqp://app:{SECRET}@rabbit:port/",
    ],
)
def test_errors_never_show_the_password(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings(url=url)
    assert SECRET not in str(info.value)
    assert SECRET not in repr(info.value)
    assert "url" in str(info.value)
    # pydantic's ValidationError (which would repeat the input) is not chained in.
    assert info.value.__cause__ is None


def test_mask_url() -> None:
    assert mask_url("amqp://guest:guest@localhost:5672/") == "amqp://guest:***@localhost:5672/"
    assert mask_url("amqps://u:p%40ss@h/v") == "amqps://u:***@h/v"
    assert mask_url("amqp://localhost/") == "amqp://localhost/"
    assert mask_url("amqp://user@localhost/") == "amqp://user@localhost/"
    text = f"tried amqp://a:{SECRET}@h1/ and amqp://b:{SECRET}@h2/"
    masked = mask_url(text)
    assert SECRET not in masked
    assert "h1" in masked and "h2" in masked


def test_merged_applies_and_validates_overrides() -> None:
    base = Settings(service="billing", prefetch=8)
    merged = base.merged(prefetch=16, confirm_timeout=3)
    assert (merged.service, merged.prefetch, merged.confirm_timeout) == ("billing", 16, 3.0)
    # The original is untouched (settings are values).
    assert (base.prefetch, base.confirm_timeout) == (8, 10.0)
    assert base.merged() is base
    with pytest.raises(ConfigError, match="prefetch"):
        base.merged(prefetch=0)


def test_merged_keeps_environment_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MQKIT_SERVICE", "from-env")
    merged = Settings().merged(prefetch=2)
    assert (merged.service, merged.prefetch) == ("from-env", 2)


def test_merged_rejects_unknown_override_and_lists_valid_ones() -> None:
    with pytest.raises(ConfigError) as info:
        Settings().merged(servcie="billing")
    text = str(info.value)
    assert "servcie" in text
    assert "service" in text  # says what is valid
    assert isinstance(info.value, ValueError)


def test_settings_are_immutable() -> None:
    settings = Settings()
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen error; any refusal will do
        settings.service = "other"  # type: ignore[misc]
    assert settings.service == "mqkit"
