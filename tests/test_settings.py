"""Settings from the environment as people type them, and a mistake told in one line before anything
starts (the launcher's check; tests/test_launch.py runs the launcher itself)."""

from __future__ import annotations

import pytest

from settings import Settings, settings_problems


@pytest.mark.parametrize("given", ["127.0.0.0/8, 10.0.0.0/8", '["127.0.0.0/8", "10.0.0.0/8"]', "127.0.0.0/8,10.0.0.0/8,"])
def test_list_settings_take_a_comma_separated_list_or_json(monkeypatch, given):
    monkeypatch.setenv("SRPO_IMAGE_URL_ALLOWED_NETWORKS", given)
    monkeypatch.setenv("SRPO_WEBHOOK_ALLOWED_NETWORKS", given)
    monkeypatch.setenv("SRPO_API_KEYS", "k1,k2")
    settings = Settings()
    assert settings.image_url_allowed_networks == settings.webhook_allowed_networks == ["127.0.0.0/8", "10.0.0.0/8"]
    assert settings.api_keys == ["k1", "k2"]
    assert settings_problems() == []


def test_each_mistake_is_one_line_naming_the_variable_the_value_and_an_example(monkeypatch):
    monkeypatch.setenv("SRPO_IMAGE_URL_ALLOWED_NETWORKS", "localhost")
    monkeypatch.setenv("SRPO_STORAGE_OPTIONS", "endpoint_url=http://minio:9000")
    monkeypatch.setenv("SRPO_MAX_PIXELS", "1536x1536")
    monkeypatch.setenv("SRPO_API_KEYS", '["unclosed"')
    assert settings_problems() == [
        "SRPO_MAX_PIXELS=1536x1536: Input should be a valid integer, unable to parse string as an integer; "
        "for example SRPO_MAX_PIXELS=2359296",
        "SRPO_IMAGE_URL_ALLOWED_NETWORKS=localhost: 'localhost' is not a network (an address or address/prefix); "
        "for example SRPO_IMAGE_URL_ALLOWED_NETWORKS=127.0.0.1/32,10.0.0.0/8",
        "SRPO_STORAGE_OPTIONS=endpoint_url=http://minio:9000: not valid JSON (Expecting value at character 0); "
        """for example SRPO_STORAGE_OPTIONS='{"endpoint_url": "http://minio:9000"}'""",
        """SRPO_API_KEYS='["unclosed"': not valid JSON (Expecting ',' delimiter at character 11); """
        "for example SRPO_API_KEYS=key1,key2",
    ]
