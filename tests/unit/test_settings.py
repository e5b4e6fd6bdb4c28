"""Settings: MQKIT_* environment, fail-over URLs, validation errors, masking, overrides."""

from __future__ import annotations

import os
import traceback
from urllib.parse import quote, unquote, urlsplit

import pytest

from mqkit.errors import ConfigError, MqkitError
from mqkit.settings import Settings, mask_url
from mqkit.urls import mask_raw_url, split_urls

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


def test_invalid_environment_value_names_the_variable_and_the_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MQKIT_PREFETCH", "abc")
    with pytest.raises(ConfigError) as info:
        Settings()
    assert "MQKIT_PREFETCH='abc': not an integer" in str(info.value)


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("MQKIT_PREFETCH", "0", "MQKIT_PREFETCH='0': must be at least 1"),
        ("MQKIT_HEARTBEAT", "-1", "MQKIT_HEARTBEAT='-1': must be at least 0"),
        ("MQKIT_CONFIRM_TIMEOUT", "soon", "MQKIT_CONFIRM_TIMEOUT='soon': not a number"),
        ("MQKIT_QUEUE_TYPE", "stream", "MQKIT_QUEUE_TYPE='stream': must be 'quorum' or 'classic'"),
        ("MQKIT_SERVICE", "", "MQKIT_SERVICE='': must not be empty"),
        ("MQKIT_AUTH", "kerberos", "MQKIT_AUTH='kerberos': must be 'plain' or 'external'"),
        ("mqkit_prefetch", "x", "mqkit_prefetch='x': not an integer"),  # as spelled there
    ],
)
def test_environment_errors_read_naturally(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as info:
        Settings()
    assert expected in str(info.value)


def test_keyword_errors_name_the_keyword_and_the_value() -> None:
    with pytest.raises(ConfigError) as info:
        Settings(prefetch="abc", heartbeat=-1)
    text = str(info.value)
    assert "prefetch='abc': not an integer" in text
    assert "heartbeat=-1: must be at least 0" in text
    assert "MQKIT_" not in text  # they came from code, not from the environment
    with pytest.raises(ConfigError, match=r"prefetch=0: must be at least 1"):
        Settings().merged(prefetch=0)


def test_environment_and_keyword_errors_together(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MQKIT_PREFETCH", "abc")
    with pytest.raises(ConfigError) as info:
        Settings(heartbeat=-1)
    assert "MQKIT_PREFETCH='abc': not an integer" in str(info.value)
    assert "heartbeat=-1: must be at least 0" in str(info.value)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("MQKIT_URL", f"amqp://app:{SECRET}@rabbit:port/"),
        ("MQKIT_URLS", f"amqp://app:{SECRET}@rabbit/,http://app:{SECRET}@other/"),
        ("MQKIT_KEY_PASSWORD", SECRET),  # set without MQKIT_KEY_FILE: invalid
    ],
)
def test_environment_errors_never_echo_a_password(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as info:
        Settings()
    assert SECRET not in str(info.value) and SECRET not in repr(info.value)


def test_invalid_port_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="port"):
        Settings(url="amqp://guest:guest@localhost:notaport/")


def test_cert_without_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="key_file"):
        Settings(url="amqps://u:p@h/", cert_file="/tmp/cert.pem")
    ok = Settings(
        url="amqps://u:p@h/", cert_file="/tmp/c.pem", key_file="/tmp/k.pem", ca_file="/ca"
    )
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


# -- passwords in malformed URLs -------------------------------------------------------------

# Each password has two distinctive halves around the character that breaks the URL, so a
# test can check that neither half shows anywhere.
HALVES = ("Kx7q", "ZEBRA-7731")
MALFORMED = {
    "space": "Kx7q ZEBRA-7731",
    "at": "Kx7q@ZEBRA-7731",
    "comma": "Kx7q,ZEBRA-7731",
    "slash": "Kx7q/ZEBRA-7731",
    "hash": "Kx7q#ZEBRA-7731",
    "question": "Kx7q?ZEBRA-7731",
    "percent": "Kx7q%ZEBRA-7731",
    "bracket": "Kx7q[ZEBRA-7731]",
}


def _everything_shown(error: BaseException) -> str:
    """Every text an error can show: str, repr, the whole cause/context chain and the
    formatted traceback."""
    parts = ["".join(traceback.format_exception(error))]
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        parts += [str(current), repr(current), repr(current.args)]
        todo += [current.__cause__, current.__context__]
    return "\n".join(parts)


def _assert_no_part_of_the_password(text: str) -> None:
    for half in HALVES:
        assert half not in text, f"{half!r} leaked: {text}"


@pytest.mark.parametrize("password", MALFORMED.values(), ids=MALFORMED.keys())
@pytest.mark.parametrize("field", ["url", "urls", "urls-string", "env-url", "env-urls"])
def test_a_malformed_url_never_shows_its_password(
    monkeypatch: pytest.MonkeyPatch, field: str, password: str
) -> None:
    url = f"amqp://probe:{password}@127.0.0.1:5672/"
    kwargs: dict[str, object] = {}
    if field == "url":
        kwargs["url"] = url
    elif field == "urls":
        kwargs["urls"] = ["amqp://ok@h1/", url]
    elif field == "urls-string":
        kwargs["urls"] = f"amqp://ok@h1/,{url}"
    elif field == "env-url":
        monkeypatch.setenv("MQKIT_URL", url)
    else:
        monkeypatch.setenv("MQKIT_URLS", f"amqp://ok@h1/,{url}")
    with pytest.raises(ConfigError) as info:
        Settings(**kwargs)
    _assert_no_part_of_the_password(_everything_shown(info.value))
    text = str(info.value)
    assert "127.0.0.1" in text and "probe" in text  # what is wrong is still recognisable
    assert info.value.__cause__ is None and info.value.__context__ is None


@pytest.mark.parametrize("password", ["Kx7q ZEBRA-7731", "Kx7q@ZEBRA-7731", "Kx7q,ZEBRA-7731"])
def test_a_malformed_url_says_to_percent_encode_and_how(password: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings(url=f"amqp://probe:{password}@rabbit:5672/")
    text = str(info.value)
    assert "must be percent-encoded" in text
    assert "urllib.parse.quote(password, safe='')" in text
    assert "amqp://probe:***@rabbit:5672/" in text


def test_percent_encoded_special_characters_are_fine() -> None:
    password = "Kx7q @,/#?%[]:ZEBRA"
    url = f"amqp://probe:{quote(password, safe='')}@rabbit:5672/my%2Fvhost"
    settings = Settings(url=url)
    assert settings.all_urls == [url]
    assert "Kx7q" not in repr(settings) and "ZEBRA" not in str(settings)
    assert urlsplit(url).password is not None
    assert unquote(urlsplit(url).password or "") == password


def test_a_colon_in_the_password_needs_no_encoding() -> None:
    settings = Settings(url="amqp://probe:Kx7q:ZEBRA@rabbit/")
    assert "Kx7q" not in repr(settings) and "ZEBRA" not in repr(settings)


def test_mask_raw_url_masks_every_form() -> None:
    for password in MALFORMED.values():
        masked = mask_raw_url(f"amqp://probe:{password}@rabbit:5672/v")
        _assert_no_part_of_the_password(masked)
        assert masked.endswith("@rabbit:5672/v") and masked.startswith("amqp://probe:***")
    assert mask_raw_url("amqp://rabbit/") == "amqp://rabbit/"
    assert mask_raw_url("amqp://probe@rabbit/") == "amqp://probe@rabbit/"
    assert mask_raw_url("probe:Kx7q@rabbit") == "probe:***@rabbit"  # no scheme
    assert mask_raw_url("amqp://Kx7q ZEBRA-7731@rabbit/") == "amqp://***@rabbit/"


def test_mask_url_in_free_text_with_a_raw_at() -> None:
    text = "tried amqp://a:Kx7q@ZEBRA-7731@h1/,amqp://b:x@h2/ and failed"
    masked = mask_url(text)
    _assert_no_part_of_the_password(masked)
    assert "h1/" in masked and "amqp://b:***@h2/" in masked


def test_split_urls_keeps_a_comma_that_starts_no_url() -> None:
    assert split_urls("amqp://a@h1/, amqp://b@h2/ ,") == ["amqp://a@h1/", "amqp://b@h2/"]
    assert split_urls("amqp://u:pa,ss@h/,amqp://x@y/") == ["amqp://u:pa,ss@h/", "amqp://x@y/"]


# -- URL parameters -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        "ssl_options=%7B%27cert_reqs%27%3A0%7D",  # pika: TLS without verification
        "auth_mechanism=EXTERNAL",
        "auth=external",  # aiormq
        "cafile=/etc/ca.pem",
        "no_verify_ssl=1",
        "ssl=1&certfile=/c.pem&keyfile=/k.pem",
    ],
)
def test_url_parameters_for_tls_or_auth_are_refused(query: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings(url=f"amqp://app:{SECRET}@rabbit:5672/?{query}")
    text = str(info.value)
    assert "TLS or authentication" in text
    assert "ca_file" in text and "auth" in text  # the settings to use instead
    assert SECRET not in text
    assert "/etc/ca.pem" not in text  # parameter values are not repeated


def test_other_url_parameters_are_refused_too() -> None:
    with pytest.raises(ConfigError) as info:
        Settings(urls=["amqp://app@rabbit/?heartbeat=5&name=x"])
    text = str(info.value)
    assert "'heartbeat'" in text and "'name'" in text and "settings" in text


# -- TLS and EXTERNAL ---------------------------------------------------------------------------


def test_key_password_is_a_secret_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(
        url="amqps://app:x@rabbit/", cert_file="/c.pem", key_file="/k.pem", key_password=SECRET
    )
    assert settings.key_password is not None
    assert settings.key_password.get_secret_value() == SECRET
    for text in (repr(settings), str(settings), str(settings.model_dump())):
        assert SECRET not in text
    monkeypatch.setenv("MQKIT_KEY_PASSWORD", SECRET)
    from_env = Settings(url="amqps://app:x@rabbit/", cert_file="/c.pem", key_file="/k.pem")
    assert from_env.key_password is not None
    assert from_env.key_password.get_secret_value() == SECRET
    assert from_env.merged(prefetch=3).key_password == from_env.key_password


def test_key_password_without_key_file_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConfigError) as info:
        Settings(key_password=SECRET)
    assert "key_password" in str(info.value) and SECRET not in str(info.value)


def test_external_auth_is_explicit_and_checked() -> None:
    cert = {"cert_file": "/c.pem", "key_file": "/k.pem"}
    settings = Settings(url="amqps://rabbit:5671/", auth="EXTERNAL", **cert)
    assert settings.auth == "external"
    assert Settings().auth == "plain"
    with pytest.raises(ConfigError, match="cert_file and key_file"):
        Settings(url="amqps://rabbit:5671/", auth="external")
    with pytest.raises(ConfigError, match="needs TLS: use amqps://"):
        Settings(url="amqp://rabbit:5672/", auth="external", **cert)
    with pytest.raises(ConfigError, match="remove the user name and password") as info:
        Settings(url=f"amqps://app:{SECRET}@rabbit:5671/", auth="external", **cert)
    assert SECRET not in str(info.value)


def test_a_client_certificate_never_falls_back_to_guest_silently() -> None:
    with pytest.raises(ConfigError) as info:
        Settings(url="amqps://rabbit:5671/", cert_file="/c.pem", key_file="/k.pem")
    text = str(info.value)
    assert "guest/guest" in text and "auth='external'" in text
    # With a user in the URL, the certificate is an extra (mutual TLS): fine.
    Settings(url="amqps://app:pw@rabbit:5671/", cert_file="/c.pem", key_file="/k.pem")


def test_memory_urls_are_accepted_and_a_malformed_one_is_refused_masked() -> None:
    assert Settings(url="memory://").url == "memory://"
    assert Settings(url="memory://billing-test.1").url == "memory://billing-test.1"
    with pytest.raises(ConfigError) as info:
        Settings(url="memory://app:s3cret@rabbit")
    text = str(info.value)
    assert "s3cret" not in text and "memory://app:***@rabbit" in text
    assert "use memory:// or memory://NAME" in text
