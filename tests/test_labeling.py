import pytest

from ls_backend.labeling import CHOICES, LABELS, UnsupportedConfig, plan_for

from .conftest import TOPIC_CONFIG


def test_single_choice_config():
    plan = plan_for(TOPIC_CONFIG)
    (control,) = plan.controls
    assert control.name == "topic" and control.kind == CHOICES and not control.multiple
    assert control.to_name == "text" and control.field == "text"
    assert control.values == ("World", "Sports", "Business", "Sci/Tech")


def test_multiple_choice_alias_and_hint():
    config = """<View><Text name="body" value="$review"/>
      <Choices name="aspects" toName="body" choice="multiple">
        <Choice value="Price" alias="price" hint="cost, money, expensive"/><Choice value="Service"/>
      </Choices></View>"""
    (control,) = plan_for(config).controls
    assert control.multiple and control.field == "review"
    assert control.values == ("price", "Service")  # Label Studio stores the alias
    assert control.labels[0].name == "Price"
    assert control.labels[0].prompt == "cost, money, expensive"
    assert control.labels[1].prompt == "Service"


def test_several_controls_predicts_supported_and_skips_the_rest():
    config = """<View><Text name="t" value="$text"/>
      <Choices name="sentiment" toName="t"><Choice value="pos"/><Choice value="neg"/></Choices>
      <Labels name="ner" toName="t"><Label value="PER"/><Label value="ORG"/></Labels>
      <TextArea name="comment" toName="t"/>
      <Image name="img" value="$image"/>
      <Choices name="image_class" toName="img"><Choice value="a"/><Choice value="b"/></Choices>
    </View>"""
    plan = plan_for(config)
    assert [(c.name, c.kind) for c in plan.controls] == [("sentiment", CHOICES), ("ner", LABELS)]
    skipped = dict(plan.skipped)
    assert set(skipped) == {"comment", "image_class"}
    assert "Text" in skipped["image_class"]


@pytest.mark.parametrize(
    "config, reason",
    [
        ('<View><Image name="i" value="$img"/><RectangleLabels name="r" toName="i"><Label value="a"/></RectangleLabels></View>', "RectangleLabels"),
        ('<View><Text name="t" value="$text"/><TextArea name="a" toName="t"/></View>', "TextArea"),
        ("<View><Text name='t' value='$text'/><Choices name='c' toName='t'><Choice value='only'/></Choices></View>", "too few labels"),
        ("<View><Text", "does not parse"),
        ('<View><Text name="t" value="$url" valueType="url"/><Choices name="c" toName="t"><Choice value="a"/>'
         '<Choice value="b"/></Choices></View>', "valueType"),
        # Label Studio shows the decoded text, and region offsets refer to it
        ('<View><Text name="t" value="$text" encoding="base64"/><Labels name="l" toName="t"><Label value="PER"/>'
         '</Labels></View>', 'encoding="base64"'),
        ('<View><Text name="t" value="$text" encoding="base64unicode"/><Choices name="c" toName="t">'
         '<Choice value="a"/><Choice value="b"/></Choices></View>', 'encoding="base64unicode"'),
        ('<View><Text name="t" value="$text"/><Labels name="l" toName="t"><Label value="PER"/></Labels>'
         '<Choices name="c" toName="t" perRegion="true"><Choice value="a"/><Choice value="b"/></Choices></View>',
         None),
        # options from each task's data: the static children (or none) are not what Label Studio shows
        ('<View><Text name="t" value="$text"/><Choices name="c" toName="t" value="$options"><Choice value="a"/>'
         '<Choice value="b"/></Choices></View>', 'value="$options"'),
        ('<View><Text name="t" value="$text"/><Labels name="l" toName="t" value="$entities"><Label value="PER"/>'
         '</Labels></View>', 'value="$entities"'),
        # markup is not the text an annotator sees: it was read whole, <style> and all
        ('<View><HyperText name="h" value="$html"/><Choices name="c" toName="h"><Choice value="a"/>'
         '<Choice value="b"/></Choices></View>', "<HyperText>'s markup is not read"),
        # a field of each item of a Repeater: it was taken for a data key no task has
        ('<View><Repeater on="$items" indexFlag="{{idx}}"><Text name="t_{{idx}}" value="$items[{{idx}}].text"/>'
         '<Choices name="c_{{idx}}" toName="t_{{idx}}"><Choice value="a"/><Choice value="b"/></Choices></Repeater>'
         '</View>', "<Repeater>"),
    ],
)
def test_unsupported_configs_say_why(config, reason):
    if reason is None:  # the rest is served; the unsupported control is skipped with its reason
        plan = plan_for(config)
        assert [c.name for c in plan.controls] == ["l"] and "perRegion" in dict(plan.skipped)["c"]
        return
    with pytest.raises(UnsupportedConfig) as info:
        plan_for(config)
    assert reason in str(info.value)


def test_signature_changes_with_labels_only():
    a = plan_for(TOPIC_CONFIG)
    b = plan_for(TOPIC_CONFIG.replace("\n", " "))
    c = plan_for(TOPIC_CONFIG.replace('<Choice value="World"/>', '<Choice value="World"/><Choice value="Health"/>'))
    assert a.signature == b.signature
    assert a.signature != c.signature


@pytest.mark.parametrize("head", ['<?xml version="1.0" encoding="UTF-8"?>', "\ufeff<?xml version='1.0'?>\n", "  <?xml version=\"1.0\"?>"])
def test_a_config_that_starts_with_an_xml_declaration_is_served_as_without_it(head):
    """Label Studio's own parser takes the declaration; the SDK's refuses one that names an encoding."""
    plain = plan_for(TOPIC_CONFIG)
    declared = plan_for(head + TOPIC_CONFIG)
    assert [(c.name, c.kind, c.values, c.field) for c in declared.controls] == \
        [(c.name, c.kind, c.values, c.field) for c in plain.controls]


def test_a_choice_with_an_empty_value_is_not_a_label():
    """Label Studio shows nothing chosen for [""]: it won short texts at 0.998 as a zero-shot label."""
    plan = plan_for('<View><Text name="t" value="$text"/><Choices name="c" toName="t"><Choice value="Sports"/>'
                    '<Choice value="Politics"/><Choice value=""/><Choice value="  "/></Choices></View>')
    assert plan.controls[0].values == ("Sports", "Politics")
