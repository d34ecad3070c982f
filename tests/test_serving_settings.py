"""Serving settings refused at start-up, with the fix in the message, instead of failing requests later."""

from __future__ import annotations

from dataclasses import fields

import pytest

from ls_backend.labeling import plan_for
from ls_backend.model import label_prompts
from ls_backend.settings import Settings, SettingsError

from .conftest import TOPIC_CONFIG

FLOAT_SETTINGS = [f.name.upper() for f in fields(Settings) if f.type == "float"]


def test_every_float_setting_is_covered():
    assert {"LEARNING_RATE", "ZERO_SHOT_TEMPERATURE", "VERSION_CHECK_INTERVAL", "EVAL_SHARE"} <= set(FLOAT_SETTINGS)


@pytest.mark.parametrize("raw", ["nan", "NaN", "inf", "-inf", "1e400"])
@pytest.mark.parametrize("name", FLOAT_SETTINGS)
def test_float_settings_refuse_values_that_are_not_finite(name, raw):
    with pytest.raises(SettingsError, match=rf"^{name}='{raw}': expected a finite number$"):
        Settings.from_env({name: raw})


@pytest.mark.parametrize("template", ["{label} {x}", "about {label} {}", "{label} {0}",
                                      "{label", "{label} }", "{label!z}"])
def test_a_zero_shot_template_with_other_fields_is_refused_with_how_to_write_braces(template):
    with pytest.raises(SettingsError, match=r"ZERO_SHOT_TEMPLATE=.*write literal braces as \{\{ and \}\}"):
        Settings.from_env({"ZERO_SHOT_TEMPLATE": template})


@pytest.mark.parametrize("template", ["a review", "{{label}}"])
def test_a_zero_shot_template_must_fill_in_the_label(template):
    with pytest.raises(SettingsError, match=r"must contain \{label\}"):
        Settings.from_env({"ZERO_SHOT_TEMPLATE": template})


def test_a_zero_shot_template_with_literal_braces_makes_the_prompts():
    settings = Settings.from_env({"ZERO_SHOT_TEMPLATE": "{{news}} about {label}"})
    control = plan_for(TOPIC_CONFIG).controls[0]
    assert label_prompts(control, settings.zero_shot_template)[:2] == ["{news} about World", "{news} about Sports"]
