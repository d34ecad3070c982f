"""Label config -> what we predict.

The config is parsed with ``label_studio_sdk.label_interface.LabelInterface``; this
module turns it into a small, hashable description of every control we can serve
(``ControlSpec``) and the reasons for the ones we skip.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, Sequence

from label_studio_sdk.label_interface import LabelInterface

log = logging.getLogger(__name__)

CHOICES = "choices"
LABELS = "labels"


class UnsupportedConfig(ValueError):
    """A label config with nothing we can predict."""


@dataclass(frozen=True)
class LabelSpec:
    """One choice or label of a control."""

    value: str  # what Label Studio stores in results (the alias where one is set)
    name: str  # the human-readable name (the `value` attribute)
    hint: str = ""

    @property
    def prompt(self) -> str:
        """The text embedded for zero-shot: the hint where set, else the name."""
        return self.hint or self.name


@dataclass(frozen=True)
class ControlSpec:
    name: str  # from_name
    kind: str  # CHOICES or LABELS
    to_name: str  # the object tag's name
    field: str  # the task data key the object reads (`value="$field"`)
    labels: tuple[LabelSpec, ...]
    multiple: bool = False
    # shown only where other controls' choices say so (``visibleWhen="choice-selected"`` or
    # ``"choice-unselected"`` on it or on a <View> around it): (mode, whenTagName, whenChoiceValue
    # values) each; not part of the signature (the model does not depend on it)
    visible_when: tuple[tuple[str, str, tuple[str, ...]], ...] = ()

    @property
    def values(self) -> tuple[str, ...]:
        return tuple(label.value for label in self.labels)

    def shown(self, chosen: dict[str, set[str]]) -> bool:
        """Whether Label Studio shows this control given the choices predicted for the task
        (control name -> the values and names chosen); a condition on a control not predicted
        cannot be judged, and holds."""
        for mode, tag, values in self.visible_when:
            if mode == _ANY_CHOSEN:  # shown while one of the controls holding the value has it chosen
                if not any(name in chosen and values[0] in chosen[name] for name in tag.split(",")):
                    return False
                continue
            if tag not in chosen:
                continue
            hit = bool(chosen[tag] & set(values)) if values else bool(chosen[tag])
            if hit != (mode == "choice-selected"):
                return False
        return True

    def signature(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "to_name": self.to_name,
            "field": self.field,
            "multiple": self.multiple,
            "labels": [[label.value, label.name, label.hint] for label in self.labels],
        }


def shown_controls(controls: Sequence[ControlSpec], chosen: dict[str, set[str]]) -> set[str]:
    """The names of the ``controls`` Label Studio shows, given the choices predicted for a task
    (control name -> the values and names chosen).  A hidden control gets no result, so a
    condition on it sees nothing selected there, and a chain of conditions is followed to its end
    (at most one pass per control: a cycle of conditions ends where it stands)."""
    shown = {control.name for control in controls}
    for _ in range(len(controls)):
        seen = {name: (values if name in shown else set()) for name, values in chosen.items()}
        now = {control.name for control in controls if control.shown(seen)}
        if now == shown:
            break
        shown = now
    return shown


@dataclass(frozen=True)
class LabelingPlan:
    """The controls of a config we serve, and why the others are skipped."""

    controls: tuple[ControlSpec, ...]
    skipped: tuple[tuple[str, str], ...] = field(default=())
    interface: LabelInterface | None = field(default=None, compare=False, repr=False)
    config: str = field(default="", compare=False, repr=False)

    @property
    def signature(self) -> str:
        """A short hash of everything about the served controls that a model depends on."""
        payload = json.dumps([c.signature() for c in self.controls], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def control(self, name: str) -> ControlSpec:
        for control in self.controls:
            if control.name == name:
                return control
        raise KeyError(name)


def field_value(data: Any, name: str) -> Any:
    """A task's data field as Label Studio reads ``value="$name"``: the key ``name`` itself, else
    the dotted path through nested objects (``$meta.text`` is ``data["meta"]["text"]``, and
    ``$items.0`` a list's first item, as lodash's ``get`` takes them); ``None`` where there is none."""
    if not isinstance(data, dict):
        return None
    if name in data:
        return data[name]
    value: Any = data
    for step in name.split("."):
        if isinstance(value, dict) and step in value:
            value = value[step]
        elif isinstance(value, list) and step.isdigit() and int(step) < len(value):
            value = value[int(step)]
        else:
            return None
    return value


def _object_field(value: str) -> str | None:
    value = (value or "").strip()
    if value.startswith("$") and len(value) > 1:
        return value[1:]
    return None


def _element(interface: LabelInterface, name: str, control: bool):
    """The element of the config's tag called ``name``: a control (it has ``toName``) or an object;
    None where the parsed tree is not at hand."""
    tree = getattr(interface, "_tree", None)
    if tree is None:
        return None
    return next((e for e in tree.iter() if e.get("name") == name and (e.get("toName") is not None) == control), None)


def _nested_choices(interface: LabelInterface, name: str) -> set[str]:
    """The values of the ``<Choice>``s inside another ``<Choice>`` of control ``name``: Label Studio
    neither shows nor selects them unless the control allows nesting."""
    element = _element(interface, name, control=True)
    nested = set()
    for choice in element.iter("Choice") if element is not None else ():
        for parent in choice.iterancestors():
            if parent is element:
                break
            if parent.tag == "Choice":
                nested.update(v for v in (choice.get("alias"), choice.get("value")) if v)
                break
    return nested


def _labels_of(control, leave_out: set[str] = frozenset()) -> tuple[LabelSpec, ...]:
    specs = []
    seen = set()
    for value, label in (control.labels_attrs or {}).items():
        attr = getattr(label, "attr", None) or {}
        # an empty value: nothing Label Studio can show as chosen
        if value in seen or value in leave_out or not str(value).strip():
            continue
        seen.add(value)
        specs.append(LabelSpec(value=value, name=attr.get("value", value), hint=attr.get("hint", "") or ""))
    return tuple(specs)


def _true(value: object) -> bool:
    return str(value or "").strip().lower() in ("true", "1", "yes")


# an XML declaration (and a byte order mark) before <View>: Label Studio's parser takes them, and
# the SDK's (lxml, given a str) refuses a declaration that names an encoding
_XML_DECLARATION = re.compile(r"^\ufeff?\s*<\?xml\b[^>]*\?>")


_CONDITIONS = ("choice-selected", "choice-unselected")
_ANY_CHOSEN = "any-chosen"  # whenChoiceValue without visibleWhen


def _visible_when(interface: LabelInterface, name: str, kind: str, to_name: str) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """The choice conditions Label Studio applies to a control (``visibleWhen`` with ``whenTagName``
    and ``whenChoiceValue``, a comma-separated list; or, the older form, ``whenChoiceValue`` alone:
    shown while any control has that value chosen).  A ``<Choices>`` is hidden by its own and every
    ``<View>`` around it; Label Studio reads no condition on ``<Labels>`` (its regions are drawn on the
    ``<Text>``), so entities are hidden by the ``<View>``s around that text only."""
    if kind == LABELS:
        element = _element(interface, to_name, control=False)
        tags = list(element.iterancestors()) if element is not None else []
    else:
        element = _element(interface, name, control=True)
        tags = [element, *element.iterancestors()] if element is not None else []
    found = []
    for tag in tags:
        mode = (tag.get("visibleWhen") or "").strip()
        if mode in _CONDITIONS and (tag.get("whenTagName") or "").strip():
            values = tuple(v.strip() for v in (tag.get("whenChoiceValue") or "").split(",") if v.strip())
            found.append((mode, tag.get("whenTagName").strip(), values))
        elif not mode and (tag.get("whenChoiceValue") or "").strip():
            found.append((_ANY_CHOSEN, "", (tag.get("whenChoiceValue").strip(),)))  # (the whole value: no list)
    return tuple(found)


def _judge_any_chosen(controls: list[ControlSpec]) -> list[ControlSpec]:
    """The older conditions (``whenChoiceValue`` alone) name a value, not a control: each becomes a
    condition on the predicted ``<Choices>`` that hold that value, or none where no predicted control
    does (a choice only annotators make cannot be judged, and the control stays shown)."""
    holders: dict[str, list[str]] = {}
    for control in controls:
        if control.kind == CHOICES:
            for label in control.labels:
                for text in {label.value, label.name}:
                    holders.setdefault(text, []).append(control.name)
    out = []
    for control in controls:
        conditions = []
        for mode, tag, values in control.visible_when:
            if mode == _ANY_CHOSEN:
                names = holders.get(values[0])
                if not names:
                    continue
                tag = ",".join(dict.fromkeys(names))
            conditions.append((mode, tag, values))
        out.append(replace(control, visible_when=tuple(conditions)))
    return out


def _plan(config: str) -> LabelingPlan:
    try:
        interface = LabelInterface(_XML_DECLARATION.sub("", config, count=1))
    except Exception as exc:  # the SDK raises several kinds for broken XML
        raise UnsupportedConfig(f"label config does not parse: {exc}") from exc
    controls: list[ControlSpec] = []
    skipped: list[tuple[str, str]] = []
    for control in interface.controls:
        tag = (control.tag or "").lower()
        if tag not in (CHOICES, LABELS):
            skipped.append((control.name, f"<{control.tag}> controls are not predicted"))
            continue
        text_objects = [o for o in control.objects if (o.tag or "").lower() == "text"]
        if len(control.objects) != 1 or len(text_objects) != 1:
            kinds = ", ".join(f"<{o.tag}>" for o in control.objects) or "none"
            skipped.append((control.name, f"only controls over exactly one <Text> object are predicted (this one: "
                                          f"{kinds}; a <HyperText>'s markup is not read as the text an annotator sees)"))
            continue
        obj = text_objects[0]
        dynamic = (control.attr.get("value") or "").strip()
        if dynamic.startswith("$"):  # Label Studio shows the options each task's data lists, not the children
            skipped.append((control.name, f"options loaded from each task's data (value=\"{dynamic}\") are not "
                                          "predicted: a model learns one fixed set of labels"))
            continue
        if tag == CHOICES and _true(control.attr.get("perRegion")):
            skipped.append((control.name, "per-region <Choices> (perRegion=\"true\") are not predicted"))
            continue
        if (obj.attr.get("valueType") or "text").lower() == "url":
            skipped.append((control.name, f"object {obj.name!r} reads its text from a URL (valueType=\"url\"), "
                                          "which is not fetched"))
            continue
        encoding = (obj.attr.get("encoding") or "none").strip().lower()
        if encoding != "none":  # Label Studio shows (and offsets refer to) the decoded text, not the task's data
            skipped.append((control.name, f"object {obj.name!r} holds encoded text (encoding=\"{encoding}\"), "
                                          "which is not decoded"))
            continue
        if tag == LABELS and (obj.tag or "").lower() != "text":
            skipped.append((control.name, "<Labels> are predicted over <Text> only"))
            continue
        data_field = _object_field(obj.value)
        if data_field is None:
            skipped.append((control.name, f"object {obj.name!r} has no value=\"$field\""))
            continue
        if "{{" in data_field or "[" in data_field:  # a <Repeater>'s $items[{{idx}}].text: one per item
            skipped.append((control.name, f"object {obj.name!r} reads {obj.value!r}, a field of each item of a "
                                          "<Repeater>, which is not predicted"))
            continue
        nested = _nested_choices(interface, control.name) if tag == CHOICES else set()
        if nested and _true(control.attr.get("allowNested")):
            skipped.append((control.name, "nested choices (allowNested=\"true\"), whose results are paths, are not "
                                          "predicted"))
            continue
        labels = _labels_of(control, nested)  # (nested ones, without allowNested: never shown, never chosen)
        multiple = tag == CHOICES and (control.attr.get("choice") or "single") == "multiple"
        if len(labels) < (2 if tag == CHOICES and not multiple else 1):
            skipped.append((control.name, f"too few labels to predict ({len(labels)})"))
            continue
        controls.append(
            ControlSpec(
                name=control.name,
                kind=tag,
                to_name=obj.name,
                field=data_field,
                labels=labels,
                multiple=multiple,
                visible_when=_visible_when(interface, control.name, tag, obj.name),
            )
        )
    controls = _judge_any_chosen(controls)
    return LabelingPlan(controls=tuple(controls), skipped=tuple(skipped), interface=interface, config=config)


@lru_cache(maxsize=256)
def plan_for(config: str) -> LabelingPlan:
    """Parse a label config (cached: Label Studio sends the same config with every call).

    Raises :class:`UnsupportedConfig` when nothing in it can be predicted.
    """
    plan = _plan(config)
    for name, reason in plan.skipped:
        log.info("control %s skipped: %s", name, reason)
    if not plan.controls:
        reasons = "; ".join(f"{name}: {reason}" for name, reason in plan.skipped) or "no control tags"
        raise UnsupportedConfig(
            "nothing to predict in this label config (supported: <Choices> or <Labels> over one <Text>); " + reasons
        )
    return plan
