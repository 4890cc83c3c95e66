from pipeline.settings import Settings, to_env


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


def test_identity_kinds_in_settings_must_be_known() -> None:
    import pydantic
    import pytest

    from pipeline.settings import IdentitySettings

    with pytest.raises(pydantic.ValidationError, match="unknown identifier kinds"):
        IdentitySettings(max_values={"emial_sha256": 2})
    assert IdentitySettings(max_values={"email_sha256": 3}).core().max_values == {"email_sha256": 3}
