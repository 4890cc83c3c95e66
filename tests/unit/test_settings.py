import re

import pydantic
import pytest

from pipeline.settings import IdentitySettings, Settings, to_env


def test_toml_file_then_environment_override_defaults(tmp_path, monkeypatch):
    config = tmp_path / "touchpoint.toml"
    config.write_text(
        '[kafka]\ntopic = "from-toml"\npartitions = 12\n\n[window]\nsize_s = 300\n\n'
        '[[alerting.rules]]\nname = "nps_low"\nkind = "threshold"\nindicator = "csat"\ncomparison = "below"\n'
        'threshold = 0.5\n'
    )
    monkeypatch.setenv("TOUCHPOINT_CONFIG", str(config))
    monkeypatch.setenv("TOUCHPOINT_KAFKA__PARTITIONS", "24")
    settings = Settings()
    assert settings.kafka.topic == "from-toml"  # TOML over the default
    assert settings.kafka.partitions == 24  # environment over TOML
    assert settings.window.size_s == 300 and settings.window.allowed_lateness_s == 10
    assert [rule["name"] for rule in settings.alerting.rules] == ["nps_low"]


def test_to_env_round_trips_through_the_environment(monkeypatch):
    original = Settings()
    original.kafka.topic = "elsewhere"
    original.window.idle_close_s = 0.5
    for key, value in to_env(original).items():
        monkeypatch.setenv(key, value)
    assert Settings() == original


@pytest.mark.parametrize(("field", "value", "message"), [
    ("max_values", {"emial_sha256": 2}, "unknown identifier kinds ['emial_sha256']"),
    ("daily_limits", {"device_id": 3}, "unknown identifier kinds ['device_id']"),
    ("unique_kinds", ["customer"], "unknown identifier kinds ['customer']"),
    ("max_values", {"email_sha256": 0}, "cap must be 1 or more"),
    ("max_values", {"user_id": 2}, "['user_id'] are unique_kinds already"),
    ("restate_horizon_s", -1, "greater than or equal to 0"),
    ("restate_horizon_s", 91 * 86_400, "less than or equal to 7776000"),
])
def test_the_identity_policy_names_only_known_kinds_and_sensible_caps(field, value, message):
    with pytest.raises(pydantic.ValidationError, match=re.escape(message)) as refused:
        IdentitySettings(**{field: value})
    assert refused.value.errors()[0]["loc"] == (field,)


def test_the_identity_caps_reach_the_core_as_set():
    assert IdentitySettings().core().max_values == {"email_sha256": 1, "phone_sha256": 1, "helpdesk_requester_id": 1}
    assert IdentitySettings(max_values={"email_sha256": 3}).core().max_values == {"email_sha256": 3}


def test_the_restate_horizon_reaches_the_core_in_milliseconds():
    assert IdentitySettings().core().restate_horizon_ms == 0  # off: merges restate nothing
    assert IdentitySettings(restate_horizon_s=3_600).core().restate_horizon_ms == 3_600_000
