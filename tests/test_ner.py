"""Labels over Text (NER): exact character offsets, BIO round trips, windows, the token head
in the registry and the predictor, training on real CoNLL-2003 sentences, and a job."""

from __future__ import annotations

import json
import unicodedata

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from ls_backend.labeling import plan_for
from ls_backend.model import ClassifierHead, Encoder
from ls_backend.ner import (
    TokenData,
    TokenHead,
    fine_tune_tokens,
    new_token_head,
    predict_spans,
    pretrained_token_head,
    run_windows,
    token_head_for,
    tokenize,
    window_size,
)
from ls_backend.registry import ModelRegistry
from ls_backend.settings import Settings, bundled_encoder_path
from ls_backend.spans import (
    begin_tag,
    bio_tags,
    decode,
    inside_tag,
    resolve_overlaps,
    resolve_span,
    span_scores,
    through_marks,
    token_tags,
    window_owners,
    windows,
)
from ls_backend.trainer import TrainingArguments

from .support.conll import CONLL_LABELS, as_text, read_sentences
from .support.data import data_file
from .support.events import NER_AND_TOPIC_CONFIG, NER_CONFIG, annotation_event, choices, key_of, project, span

LABELS = ["PER", "ORG"]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundled_encoder_path())


def offsets_of(tokenizer, text: str) -> list[tuple[int, int]]:
    return tokenize(tokenizer, [text])[0].offsets


# -- tags and decoding ------------------------------------------------------------------------
def test_tags_are_o_then_begin_inside_per_label_in_config_order():
    assert bio_tags(["PER", "ORG"]) == ["O", "B-PER", "I-PER", "B-ORG", "I-ORG"]
    assert (begin_tag(1), inside_tag(1)) == (3, 4)


def test_adjacent_entities_of_one_type_stay_apart_when_the_tags_say_b(tokenizer):
    text = "Ann Bob met Carl"
    offsets = offsets_of(tokenizer, text)
    tags = [begin_tag(0), begin_tag(0), 0, begin_tag(0)]
    found = [s.span for s in decode(text, offsets, tags, LABELS)]
    assert found == [(0, 3, "PER"), (4, 7, "PER"), (12, 16, "PER")]
    merged = [s.span for s in decode(text, offsets, [begin_tag(0), inside_tag(0), 0, begin_tag(0)], LABELS)]
    assert merged == [(0, 7, "PER"), (12, 16, "PER")]


def test_inside_after_outside_or_another_type_starts_an_entity(tokenizer):
    text = "in New York Times today"
    offsets = offsets_of(tokenizer, text)
    tags = [0, inside_tag(0), inside_tag(1), inside_tag(1), 0]
    assert [s.span for s in decode(text, offsets, tags, LABELS)] == [(3, 6, "PER"), (7, 17, "ORG")]


def test_a_word_is_read_by_its_first_pieces_tag_so_no_span_cuts_a_word(tokenizer):
    """Tags are per word piece: a B on a continuation piece split "Klinsmann" into "K" + "linsmann",
    a type change inside "Volgograd" made two entities of it, and an O on its last piece cut it."""
    labels = ["PER", "LOC", "ORG"]
    text = "Juergen Klinsmann met in Volgograd ."
    tokenized = tokenize(tokenizer, [text])[0]
    pieces = [text[a:b] for a, b in tokenized.offsets]
    assert pieces == ["Ju", "er", "gen", "K", "lins", "mann", "met", "in", "Vol", "go", "grad", "."]
    index = {tag: i for i, tag in enumerate(bio_tags(labels))}
    cases = {
        "B on a continuation piece": ["B-PER", "I-PER", "I-PER", "B-PER", "B-PER", "I-PER", "O", "O", "B-LOC", "I-LOC", "I-LOC", "O"],
        "a type change inside a word": ["B-PER", "I-PER", "I-PER", "I-PER", "I-PER", "I-PER", "O", "O", "B-ORG", "I-ORG", "I-LOC", "O"],
        "O on a continuation piece": ["B-PER", "I-PER", "I-PER", "I-PER", "I-PER", "O", "O", "O", "B-LOC", "I-LOC", "O", "O"],
    }
    expected = {
        "B on a continuation piece": [("Juergen", "PER"), ("Klinsmann", "PER"), ("Volgograd", "LOC")],
        "a type change inside a word": [("Juergen Klinsmann", "PER"), ("Volgograd", "ORG")],
        "O on a continuation piece": [("Juergen Klinsmann", "PER"), ("Volgograd", "LOC")],
    }
    for name, tags in cases.items():
        found = decode(text, tokenized.offsets, [index[t] for t in tags], labels, words=tokenized.words)
        assert [(text[s.start:s.end], s.label) for s in found] == expected[name], name
    # an O first piece keeps the whole word out, whatever its other pieces say
    tags = ["O"] * 8 + ["O", "B-LOC", "I-LOC", "O"]
    assert decode(text, tokenized.offsets, [index[t] for t in tags], labels, words=tokenized.words) == []
    # the score is the mean over the words' first pieces, where the decisions were made
    probabilities = [0.9, 0.1, 0.1] + [0.5] * 9
    tags = ["B-PER", "O", "O"] + ["O"] * 9
    found = decode(text, tokenized.offsets, [index[t] for t in tags], labels, probabilities, tokenized.words)
    assert [(text[s.start:s.end], s.score) for s in found] == [("Juergen", pytest.approx(0.9))]


@pytest.mark.parametrize("text, entities", [
    ("나는 어제 서울에서 김민수를 만났다", [("서울", "LOC"), ("김민수", "PER")]),  # Korean: particles joined to the noun
    ("東京タワーに行きました", [("東京タワー", "LOC")]),  # Japanese: kana runs
    ("ผมไปกรุงเทพเมื่อวาน", [("กรุงเทพ", "LOC")]),  # Thai: no spaces between words
])
def test_in_scripts_without_spaces_between_words_an_entity_may_end_inside_the_tokenizers_word(tokenizer, text, entities):
    """The tokenizer's "word" there is a run of text ("서울에서", "タワーに", the whole Thai phrase):
    read by its first piece's tag, every entity swallowed the rest of the run, and a model that
    learned the annotations' tags exactly still served "서울에서"."""
    labels = ["PER", "LOC"]
    gold = [(text.index(e), text.index(e) + len(e), label) for e, label in entities]
    tokenized = tokenize(tokenizer, [text])[0]
    tags, report = token_tags(tokenized.offsets, gold, labels)
    assert report.snapped == 0  # the annotated ends are token ends: the model can learn them
    found = decode(text, tokenized.offsets, tags, labels, words=tokenized.words)
    assert [(text[s.start:s.end], s.label) for s in found] == entities


def test_a_symbol_the_vocabulary_cannot_read_no_longer_hides_the_word_it_touches(tokenizer, encoder):
    """WordPiece reads a whole word as [UNK] for one emoji in it: "❤️Paris" was never seen as Paris,
    by the entity heads or the classification heads, and every entity beside one took it in."""
    from ls_backend.text import readable

    text = "I ❤️Paris and Berlin✈️Rome"
    tokenized = tokenize(tokenizer, [text])[0]
    unk = tokenizer.unk_token_id
    assert readable(tokenizer, text) != text
    assert [text[a:b] for a, b in tokenized.offsets] == ["I", "❤", "Paris", "and", "Berlin", "✈", "Rome"]
    assert [i == unk for i in tokenized.ids] == [False, True, False, False, False, True, False]  # each emoji its own [UNK]
    spans = [(4, 9, "PER"), (14, 20, "ORG"), (22, 26, "ORG")]  # Paris, Berlin, Rome
    tags, report = token_tags(tokenized.offsets, spans, LABELS)
    assert report.shared_token == 0 and [s.span for s in decode(text, tokenized.offsets, tags, LABELS)] == spans
    assert encoder.tokenize([text])[0][1:-1] == tokenized.ids  # the classification path reads it alike
    assert readable(tokenizer, "°C and ñ are read as they are") == "°C and ñ are read as they are"


def test_decoded_spans_are_trimmed_of_surrounding_whitespace():
    text = "  Ann  \n"
    found = decode(text, [(0, 5), (5, 8)], [begin_tag(0), inside_tag(0)], LABELS, [0.9, 0.5])
    assert [s.span for s in found] == [(2, 5, "PER")]
    assert found[0].score == pytest.approx(0.7)
    assert decode(" \n", [(0, 2)], [begin_tag(0)], LABELS) == []


def test_a_span_that_cuts_a_token_is_widened_to_whole_tokens(tokenizer):
    text = "Washington said"
    offsets = offsets_of(tokenizer, text)
    tags, report = token_tags(offsets, [(2, 6, "PER")], LABELS)
    assert report.snapped == 1
    assert [s.span for s in decode(text, offsets, tags, LABELS)] == [(0, 10, "PER")]


def test_overlapping_spans_keep_the_longest_then_the_earliest():
    kept, dropped = resolve_overlaps([(0, 4, "PER"), (0, 9, "ORG"), (5, 9, "PER"), (10, 12, "PER"), (11, 13, "ORG")])
    assert kept == [(0, 9, "ORG"), (10, 12, "PER")]
    assert sorted(dropped) == [(0, 4, "PER"), (5, 9, "PER"), (11, 13, "ORG")]
    kept, _ = resolve_overlaps([(3, 6, "ORG"), (3, 6, "PER")])  # the same region twice: the first listed
    assert kept == [(3, 6, "ORG")]


def test_annotation_offsets_are_checked_against_the_text():
    text = "Hi 😀 from Zürich and Zürich"
    start = text.index("Zürich")
    assert resolve_span(text, {"start": start, "end": start + 6, "text": "Zürich"}) == (start, start + 6)
    # a browser counts the emoji as two UTF-16 units
    assert resolve_span(text, {"start": start + 1, "end": start + 7, "text": "Zürich"}) == (start, start + 6)
    # offsets off by a few characters: the nearest occurrence of the text
    assert resolve_span(text, {"start": 20, "end": 26, "text": "Zürich"}) == (text.rindex("Zürich"), len(text))
    assert resolve_span(text, {"start": 0, "end": 2, "text": "Paris"}) is None
    assert resolve_span(text, {"start": "0", "end": 2}) is None
    # UTF-16 offsets, and a run of spaces shown as one in the region's text (as the editor writes it)
    text = "😀 Text: Berlin,  Germany."
    assert resolve_span(text, {"start": 9, "end": 25, "text": "Berlin, Germany"}) == (8, 24)


def test_windows_cover_every_token_and_each_token_has_one_owner():
    assert windows(5, 10) == [(0, 5)]
    ranges = windows(25, 10)
    assert ranges == [(0, 10), (8, 18), (15, 25)]
    assert all(b - a == 10 for a, b in ranges)
    owners = window_owners(25, ranges)
    assert [w for w, _ in owners] == [0] * 9 + [1] * 8 + [2] * 8  # a tie (token 16) goes to the earlier window
    assert all(ranges[w][0] + pos == t for t, (w, pos) in enumerate(owners))
    assert window_owners(25, ranges) == owners  # deterministic


def test_tokens_of_one_character_never_make_two_spans_of_it(tokenizer):
    """The tokenizer splits a Hangul syllable into its letters, each with the syllable's range:
    whatever the letters' tags, the character's first token decides, so no span repeats or
    crosses another on that character."""
    text = "김민수 씨는 삼성 직원이다"
    offsets = offsets_of(tokenizer, text)
    assert offsets[:3] == [(0, 1)] * 3  # 김: three tokens, one character
    per, org = begin_tag(0), begin_tag(1)
    cases = {
        (per, per, per): [(0, 1, "PER")],  # B on every letter: one span
        (per, org, 0): [(0, 1, "PER")],  # another label on a later letter: still the first token's
        (0, per, per): [],  # the first letter says O: the others start nothing
        (per, inside_tag(0), inside_tag(0), inside_tag(0), per): [(0, 2, "PER")],  # B on 민's second letter
    }
    for head, spans in cases.items():
        tags = list(head) + [0] * (len(offsets) - len(head))
        found = decode(text, offsets, tags, LABELS, [0.9] * len(offsets))
        assert [s.span for s in found] == spans, head


def test_entity_scores_are_exact_match_micro_and_per_label():
    gold = [[(0, 3, "PER"), (8, 12, "ORG")], [(0, 5, "LOC")], []]
    pred = [[(0, 3, "PER"), (8, 11, "ORG")], [(0, 5, "PER")], [(1, 2, "PER")]]
    scores = span_scores(gold, pred)
    assert (scores["entities"], scores["predicted"]) == (3, 4)
    assert scores["precision"] == 0.25 and scores["recall"] == pytest.approx(0.3333, abs=1e-4)
    assert scores["f1"] == pytest.approx(2 * 0.25 * (1 / 3) / (0.25 + 1 / 3), abs=1e-4)
    assert scores["per_label"]["PER"]["precision"] == pytest.approx(1 / 3, abs=1e-4)
    assert scores["per_label"]["LOC"]["recall"] == 0.0
    assert span_scores([[]], [[]])["f1"] == 1.0


# -- properties over the real tokenizer --------------------------------------------------------
TEXT_ALPHABET = st.sampled_from(
    list("abcXYZ019 .,;-'\"()") + ["  ", "\n", "\n\n", "\t", "é", "Ü", "ß", "東", "京", "😀", "🎉", "👍🏽", "\u200b", "\u0301", "\x00",
     "\u0308", "\ufe0f", "\u064f", "\u093e", "क", "김", "민", "한"]  # a Hangul syllable: several tokens, one range
)
texts = st.lists(TEXT_ALPHABET, min_size=0, max_size=60).map("".join)


@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts, data=st.data())
def test_decoded_spans_always_slice_the_text_exactly(tokenizer, text, data):
    offsets = offsets_of(tokenizer, text)
    n_tags = len(bio_tags(LABELS))
    tags = data.draw(st.lists(st.integers(0, n_tags - 1), min_size=len(offsets), max_size=len(offsets)))
    probs = data.draw(st.lists(st.floats(0.0, 1.0), min_size=len(offsets), max_size=len(offsets)))
    found = decode(text, offsets, tags, LABELS, probs)
    starts = {a for a, b in offsets if b > a}
    ends = {b for a, b in offsets if b > a}
    previous_end = 0
    for s in found:
        assert 0 <= s.start < s.end <= len(text)
        piece = text[s.start : s.end]
        assert piece == piece.strip() and piece  # trimmed, never empty
        assert s.start >= previous_end  # sorted, never overlapping
        previous_end = s.end
        # on token boundaries, or moved inward only past whitespace, or outward past combining marks
        assert s.start in starts or text[: s.start].rstrip() != text[: s.start]
        marks = len(piece) - len(piece.rstrip("".join(c for c in set(piece) if unicodedata.category(c).startswith("M"))))
        assert any(e in ends or text[e:].lstrip() != text[e:] for e in range(s.end - marks, s.end + 1))
        # never ends between a character and its combining mark, unless the next token starts there
        assert s.end == len(text) or not unicodedata.category(text[s.end]).startswith("M") or s.end in starts
        assert 0.0 <= s.score <= 1.0
        item = {"start": s.start, "end": s.end, "text": piece}
        assert resolve_span(text, item) == (s.start, s.end)


@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts, data=st.data())
def test_spans_to_token_tags_and_back_give_the_same_spans(tokenizer, text, data):
    offsets = [o for o in offsets_of(tokenizer, text) if o[1] > o[0]]
    if not offsets:
        return
    # random non-overlapping token ranges, each with a label: what an annotator could select (whole
    # characters: a cut never falls between the tokens of one character, as in a Hangul syllable)
    whole, reach = [], 0
    for t, (a, b) in enumerate(offsets):
        if a >= reach:
            whole.append(t)
        reach = max(reach, b)
    cuts = sorted(set(data.draw(st.lists(st.sampled_from(whole + [len(offsets)]), max_size=8))))
    spans = []
    for a, b in zip(cuts, cuts[1:]):
        if data.draw(st.booleans()):
            start, end = offsets[a][0], offsets[b - 1][1]
            while start < end and text[start].isspace():
                start += 1
            while end > start and text[end - 1].isspace():
                end -= 1
            if start < end:  # an annotator's region takes the combining marks after its last letter
                end = through_marks(text, end, offsets[b][0] if b < len(offsets) else None)
                spans.append((start, end, data.draw(st.sampled_from(LABELS))))
    tags, report = token_tags(offsets, spans, LABELS)
    assert report.snapped == report.empty == report.overlapping == 0
    assert [s.span for s in decode(text, offsets, tags, LABELS)] == spans

    # any character span, cutting tokens or not, comes back as the whole tokens it touches
    a = data.draw(st.integers(0, len(text)))
    b = data.draw(st.integers(a, len(text)))
    touched = [o for o in offsets if o[0] < b and a < o[1]]
    tags, report = token_tags(offsets, [(a, b, "ORG")], LABELS)
    back = [s.span for s in decode(text, offsets, tags, LABELS)]
    if touched:
        following = [o[0] for o in offsets if o[0] >= touched[-1][1]]
        assert back == [(touched[0][0], through_marks(text, touched[-1][1], min(following, default=None)), "ORG")]
        assert report.snapped == int(touched[0][0] < a or touched[-1][1] > b)
    else:
        assert back == [] and report.empty == 1


# -- the head in the model shape ------------------------------------------------------------------
def test_token_heads_and_classifier_heads_round_trip_through_the_registry(tmp_path):
    registry = ModelRegistry(tmp_path)
    rng = np.random.default_rng(0)
    token = TokenHead(["PER", "ORG"], rng.normal(size=(5, 8)).astype(np.float32), rng.normal(size=5).astype(np.float32),
                      trained=True, source="trained")
    topic = ClassifierHead(["World", "Sports"], rng.normal(size=(2, 8)).astype(np.float32), np.zeros(2, np.float32))
    name = registry.create_version("3.1", {"ner": token, "topic": topic}, {"kind": "test"})
    loaded = registry.load("3.1", name)
    assert isinstance(loaded.heads["ner"], TokenHead) and isinstance(loaded.heads["topic"], ClassifierHead)
    assert np.array_equal(loaded.heads["ner"].weight, token.weight) and loaded.heads["ner"].trained
    assert loaded.meta["controls"]["ner"]["head"] == "token"
    assert loaded.meta["controls"]["ner"]["tags"] == ["O", "B-PER", "I-PER", "B-ORG", "I-ORG"]
    # a version written before token heads existed: no marker -> a classification head
    meta_path = registry.version_dir("3.1", name) / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["controls"]["ner"]
    meta["controls"]["topic"] = {k: v for k, v in meta["controls"]["topic"].items() if k in ("labels", "temperature")}
    meta_path.write_text(json.dumps(meta))
    old = registry.load("3.1", name)
    assert list(old.heads) == ["topic"] and isinstance(old.heads["topic"], ClassifierHead)


def test_a_changed_label_set_keeps_learned_rows_and_never_predicts_new_labels_untrained():
    control = plan_for(NER_AND_TOPIC_CONFIG).control("ner")
    head = new_token_head(["PER", "ORG"], 4)
    head.weight[:] = np.arange(20, dtype=np.float32).reshape(5, 4)
    head.trained = True
    changed = plan_for(NER_AND_TOPIC_CONFIG.replace('<Label value="ORG"/>', '<Label value="LOC"/><Label value="ORG"/>'))
    adapted = token_head_for(changed.control("ner"), head, 4)
    assert adapted.labels == ["PER", "LOC", "ORG"] and adapted.untrained_labels == ["LOC"]
    assert np.array_equal(adapted.weight[[0, 1, 2, 5, 6]], head.weight)
    assert (adapted.bias[3:5] < head.bias[0] - 5).all() and not adapted.weight[3:5].any()
    assert token_head_for(control, head, 4) is head
    assert not token_head_for(control, None, 4).trained


def test_a_removed_or_renamed_label_gives_way_to_o_not_to_the_next_label(tmp_path):
    """Removing ORG dropped its rows, so on a token the head read as ORG its share went to the
    remaining tags in proportion, and the runner-up (LOC) won, surer than ORG had been; a renamed
    label (ORG -> Organization: the old one removed, the new one untrained) did the same."""
    from ls_backend.ner import served_probabilities

    config = NER_AND_TOPIC_CONFIG.replace('<Label value="ORG"/>', '<Label value="ORG"/><Label value="LOC"/>')
    head = new_token_head(["PER", "ORG", "LOC"], 3)
    head.weight[:] = 0.0
    head.weight[3, 0] = 3.0  # B-ORG: a token along the first axis is an organisation ...
    head.weight[5, 0] = 2.0  # ... B-LOC its runner-up
    head.trained = True
    token = np.array([[1.0, 0.0, 0.0]], dtype=np.float32)
    before = head.probabilities(token)[0]
    assert before.argmax() == 3
    tags_of = lambda labels: {t: i for i, t in enumerate(bio_tags(labels))}  # noqa: E731

    removed = token_head_for(plan_for(config.replace('<Label value="ORG"/>', "")).control("ner"), head, 3)
    assert removed.labels == ["PER", "LOC"] and removed.retired == ["ORG"]
    after = removed.probabilities(token)[0]
    assert after.argmax() == 0  # O: no organisation turned into a location
    assert after[tags_of(removed.labels)["B-LOC"]] == pytest.approx(before[5], rel=1e-5)
    assert after[0] == pytest.approx(before[0] + before[3] + before[4], rel=1e-5) and after.sum() == pytest.approx(1.0)
    # kept through the registry, and a label that comes back gets its rows again, trained
    name = ModelRegistry(tmp_path).create_version("3.1", {"ner": removed}, {"kind": "test"})
    loaded = ModelRegistry(tmp_path).load("3.1", name).heads["ner"]
    assert loaded.retired == ["ORG"] and np.allclose(loaded.probabilities(token), removed.probabilities(token))
    back = token_head_for(plan_for(config).control("ner"), loaded, 3)
    assert back.labels == ["PER", "ORG", "LOC"] and back.retired == [] and back.untrained_labels == []
    assert np.allclose(back.probabilities(token), head.probabilities(token))

    renamed = token_head_for(plan_for(config.replace('"ORG"', '"Organization"')).control("ner"), head, 3)
    assert renamed.untrained_labels == ["Organization"] and renamed.retired == ["ORG"]
    served = served_probabilities(renamed.probabilities(token), renamed)[0]
    index = tags_of(renamed.labels)
    assert served.argmax() == 0 and served[index["B-LOC"]] == pytest.approx(before[5], rel=1e-5)
    assert served[index["B-Organization"]] == 0.0 and served.sum() == pytest.approx(1.0)


def test_a_token_classification_base_model_with_the_projects_tags_gives_a_cold_start_head(tmp_path):
    from safetensors.numpy import save_file

    control = plan_for(NER_AND_TOPIC_CONFIG).control("ner")
    folder = tmp_path / "tagger"
    folder.mkdir()
    id2label = {0: "O", 1: "B-ORG", 2: "I-ORG", 3: "B-PER", 4: "I-PER", 5: "B-LOC", 6: "I-LOC"}
    config = {"architectures": ["BertForTokenClassification"], "id2label": {str(k): v for k, v in id2label.items()}}
    (folder / "config.json").write_text(json.dumps(config))
    weight = np.arange(7 * 4, dtype=np.float32).reshape(7, 4)
    save_file({"classifier.weight": weight, "classifier.bias": np.arange(7, dtype=np.float32)}, str(folder / "model.safetensors"))
    head = pretrained_token_head(control, str(folder), 4)
    assert head is not None and head.trained and head.source == "base-model"
    assert np.array_equal(head.weight, weight[[0, 3, 4, 1, 2]])  # O, B-PER, I-PER, B-ORG, I-ORG
    config["id2label"] = {"0": "O", "1": "B-PER", "2": "I-PER"}  # no ORG tags: no head
    (folder / "config.json").write_text(json.dumps(config))
    assert pretrained_token_head(control, str(folder), 4) is None


def test_the_first_window_gives_the_classification_embedding(encoder):
    texts = ["Germany beat Brazil 2-1 in Berlin on Sunday .", "word " * 400, "Ü 😀 東京"]
    run = run_windows(encoder, tokenize(encoder.tokenizer, texts), [], batch_size=2)
    assert np.allclose(run.pooled, encoder.encode(texts), atol=1e-4)


def test_before_ner_training_every_task_gets_an_entry_with_choices_and_no_spans(client):
    tasks = [{"id": i, "data": {"text": t}} for i, t in enumerate(["Ann lives in Paris.", "", "Sports today"])]
    tasks.append({"id": 9, "data": {}})
    body = client.post("/predict", json={"tasks": tasks, "project": "5.1", "label_config": NER_AND_TOPIC_CONFIG}).get_json()
    results = body["results"]
    assert len(results) == 4
    assert [len(r["result"]) for r in results] == [1, 0, 1, 0]
    assert all(item["type"] == "choices" for r in results for item in r["result"])
    only_ner = client.post("/predict", json={"tasks": tasks, "project": "6.1", "label_config": NER_CONFIG}).get_json()
    assert [r["result"] for r in only_ner["results"]] == [[], [], [], []]
    assert all(isinstance(r["model_version"], str) for r in only_ner["results"])


# -- trained on real sentences ---------------------------------------------------------------------
MAX_LENGTH = 64  # small windows keep the long-text test short


@pytest.fixture(scope="module")
def conll_model():
    """A token head and encoder fine-tuned briefly on 300 CoNLL-2003 training sentences written
    as running text (``said.``, ``(AP)``), 64-token windows; about a minute on two cores."""
    sentences = read_sentences(data_file("conll2003", "eng.train"), limit=300)
    rows = [as_text(s, natural=True) for s in sentences]
    data = TokenData("ner", list(CONLL_LABELS), [t for t, _, _ in rows], [s for _, s, _ in rows])
    encoder = Encoder(bundled_encoder_path(), "cpu", MAX_LENGTH)
    args = TrainingArguments(max_length=MAX_LENGTH, epochs=2, min_steps=1, batch_size=16, learning_rate=2e-4,
                             head_learning_rate=2e-3)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared machine, spinning threads cost far more than they give
    try:
        student, heads, report = fine_tune_tokens(encoder, {"ner": new_token_head(CONLL_LABELS, encoder.dim)}, [data], args)
    finally:
        torch.set_num_threads(threads)
    return student, heads["ner"], report


def test_a_model_trained_on_conll_predicts_spans_that_slice_the_text_on_token_boundaries(conll_model):
    student, head, report = conll_model
    assert report["steps"] >= 30 and report["final_loss"] < 1.0, report
    rows = [as_text(s, natural=True) for s in read_sentences(data_file("conll2003", "eng.testa"), limit=200)]
    texts = [t for t, _, _ in rows]
    found = predict_spans(student, head, texts)
    tokenized = tokenize(student.tokenizer, texts)
    n_spans = 0
    for text, spans, tok in zip(texts, found, tokenized):
        starts = {a for a, _ in tok.offsets}
        ends = {b for _, b in tok.offsets}
        for s in spans:
            n_spans += 1
            assert 0 <= s.start < s.end <= len(text)
            assert s.start in starts and s.end in ends, (text, s)
            assert text[s.start : s.end] == text[s.start : s.end].strip()
    scores = span_scores([g for _, g, _ in rows], [[s.span for s in spans] for spans in found])
    assert n_spans > 50 and scores["f1"] > 0.3, scores


def test_renamed_labels_are_not_predicted_before_a_job_trains_them(encoder):
    """The config renames the labels of a trained head (the fast lane's, fitted on frozen
    embeddings of 200 CoNLL sentences): the new labels start untrained, and none is predicted,
    though on entity-like tokens the trained O row falls below their starting rows (every such
    token was tagged with the first new label); the labels kept go on being predicted."""
    from ls_backend.ner import fit_token_head

    rows = [as_text(s, natural=True) for s in read_sentences(data_file("conll2003", "eng.train"), limit=200)]
    data = TokenData("ner", list(CONLL_LABELS), [t for t, _, _ in rows], [s for _, s, _ in rows])
    head, _ = fit_token_head(encoder, new_token_head(CONLL_LABELS, encoder.dim), data, TrainingArguments(max_length=128))
    texts = [as_text(s, natural=True)[0] for s in read_sentences(data_file("conll2003", "eng.testa"), limit=300)]

    def config(labels):
        return plan_for('<View><Labels name="ner" toName="text">' + "".join(f'<Label value="{v}"/>' for v in labels)
                        + '</Labels><Text name="text" value="$text"/></View>').control("ner")

    def labels_found(adapted):
        return {s.label for spans in predict_spans(encoder, adapted, texts) for s in spans}

    assert labels_found(head) == set(CONLL_LABELS)
    renamed = token_head_for(config(["Person", "Organization", "Location", "Misc"]), head, encoder.dim)
    assert renamed.trained and renamed.untrained_labels == ["Person", "Organization", "Location", "Misc"]
    assert labels_found(renamed) == set()
    one = token_head_for(config(["PER", "ORG", "PLACE", "MISC"]), head, encoder.dim)
    assert one.untrained_labels == ["PLACE"] and labels_found(one) == {"PER", "ORG", "MISC"}


def test_a_text_ten_windows_long_gets_entities_in_its_last_window(conll_model):
    student, head, _ = conll_model
    filler = [as_text(s)[0] for s in read_sentences(data_file("conll2003", "eng.testa"), limit=400, offset=200)]
    tail = "Rudi Voeller and Juergen Klinsmann met in Berlin on Monday ."
    text, k = "", 0
    while len(tokenize(student.tokenizer, [text + tail])[0].ids) < 10 * MAX_LENGTH:
        text += filler[k % len(filler)] + "\n"
        k += 1
    text += tail
    tokenized = tokenize(student.tokenizer, [text])[0]
    ranges = windows(len(tokenized.ids), window_size(student.tokenizer, MAX_LENGTH))
    assert len(ranges) >= 10
    last_start = tokenized.offsets[ranges[-1][0]][0]
    (found,) = predict_spans(student, head, [text])
    late = [s for s in found if s.start >= len(text) - len(tail)]
    assert late, f"no entity found in the last window (which starts at character {last_start})"
    assert all(text[s.start : s.end].strip() == text[s.start : s.end] for s in found)
    assert {text[s.start : s.end] for s in late} & {"Rudi Voeller", "Juergen Klinsmann", "Berlin"}, late


# -- a fine-tuning job over a project with Choices and Labels on one Text --------------------------
def test_a_job_trains_the_labels_control_refits_the_choices_head_and_serves_both(tmp_path, encoder):
    from ls_backend.finetune import FineTuneJob
    from ls_backend.ner_job import encoder_is_taken
    from ls_backend.predictor import Predictor
    from ls_backend.store import CorrectionStore

    settings = Settings(model_dir=tmp_path / "models", max_length=MAX_LENGTH, train_max_length=MAX_LENGTH,
                        train_mode="auto", train_epochs=4, train_min_steps=10, eval_min=5)
    store = CorrectionStore.from_settings(settings)
    proj = project(7, config=NER_AND_TOPIC_CONFIG, title="ner and topic")
    key = key_of(7)
    sentences = read_sentences(data_file("conll2003", "eng.train"), limit=80)
    texts = []
    for n, sentence in enumerate(sentences):
        text, spans, _ = as_text(sentence, natural=True)
        texts.append(text)
        result = [span(a, b, text[a:b], label) for a, b, label in spans if label in ("PER", "ORG")]
        result += choices("Sports" if any(ch.isdigit() for ch in text) else "World")
        store.record_event(annotation_event(n + 1, 100 + n, result, text=text, proj=proj))
    try:
        outcome = FineTuneJob(settings, store).run(key)
    finally:
        store.close()
    assert outcome["promoted"], outcome
    registry = ModelRegistry(settings.model_dir)
    meta = registry.meta(key, outcome["version"])
    assert meta["recipe"] in ("ner-full", "ner-frozen")
    assert set(meta["metrics"]) == {"current", "ner-full", "ner-frozen"}
    assert meta["metrics"]["current"]["controls"]["ner"]["f1"] == 0.0  # untrained: no spans
    assert set(meta["metrics"][meta["recipe"]]["controls"]) == {"ner", "topic"}
    # CoNLL repeats datelines ("LONDON 1996-08-22"): a training task repeating a text of the slice is left out
    from ls_backend.finetune import in_eval_slice

    judged = {t for n, t in enumerate(texts) if in_eval_slice(100 + n, settings.eval_share)}
    twins = sum(t in judged for n, t in enumerate(texts) if not in_eval_slice(100 + n, settings.eval_share))
    assert meta["data"]["ner"]["train"] + meta["data"]["ner"]["eval"] == 80 - twins
    assert meta["data"]["ner"]["eval"] == sum(in_eval_slice(100 + n, settings.eval_share) for n in range(80))
    assert meta["controls"]["ner"]["head"] == "token" and meta["controls"]["ner"]["trained"]
    assert "classification_refit" in meta["training"]["ner-full"]
    loaded = registry.load(key, outcome["version"])
    assert encoder_is_taken(loaded.heads, {})  # a later classification-only job keeps this encoder

    predictor = Predictor(settings, registry, encoder=encoder)
    tasks = [{"id": i, "data": {"text": t}} for i, t in enumerate(texts[:40])]
    predictions = predictor.predict(key, NER_AND_TOPIC_CONFIG, tasks)
    assert len(predictions) == 40 and {p["model_version"] for p in predictions} == {outcome["version"]}
    spans_found = 0
    for task, prediction in zip(tasks, predictions):
        kinds = [item["type"] for item in prediction["result"]]
        assert kinds.count("choices") == 1
        for item in prediction["result"]:
            if item["type"] == "labels":
                value = item["value"]
                assert value["text"] == task["data"]["text"][value["start"] : value["end"]]
                assert value["labels"][0] in ("PER", "ORG") and 0 <= item["score"] <= 1
                spans_found += 1
        assert 0 <= prediction["score"] <= 1
    assert spans_found > 0


# -- what a job learns from, and how it is judged -----------------------------------------------
def test_region_text_with_whitespace_runs_shown_as_one_space_keeps_its_offsets():
    # Label Studio's editor writes a region's text with each run of whitespace as one space
    text = "Text: Berlin,  Germany.\nMeet John\n\tSmith today"
    assert resolve_span(text, {"start": 6, "end": 22, "text": "Berlin, Germany"}) == (6, 22)
    start = text.index("John")
    assert resolve_span(text, {"start": start, "end": start + 12, "text": "John Smith"}) == (start, start + 12)


def test_a_span_never_ends_between_a_letter_and_its_combining_mark(tokenizer):
    # decomposed text (macOS, PDF extractions), Arabic vowel marks, an emoji's variation selector:
    # the tokenizer drops the marks, so the last token ends before them
    for text, word in (("Zoe\u0308 met Jose\u0301", "Jose\u0301"), ("met \u0645\u064f\u062d\u064e\u0645\u0651\u064e\u062f\u064c", None),
                       ("ok \u2764\ufe0f now", "\u2764\ufe0f")):
        word = word or text.split()[-1]
        offsets = offsets_of(tokenizer, text)
        start = text.index(word)
        tags = [1 if a == start else 2 if start < a < start + len(word) else 0 for a, b in offsets]
        found = decode(text, offsets, tags, ["PER"])
        assert [text[s.start:s.end] for s in found] == [word], (text, found)
    # gold spans drawn over the whole word match such a prediction; a region that left the mark out too
    from ls_backend.ner import as_tagged

    assert as_tagged(tokenizer, ["Zoe\u0308 met"], [[(0, 3, "PER")]], ["PER"]) == [[(0, 4, "PER")]]


def test_a_task_with_a_region_that_cannot_be_placed_or_read_is_left_out_of_ner_training():
    from ls_backend.ner_job import spans_of

    text = "Angela Merkel visited Paris"
    placed, counts = spans_of(text, [span(0, 13, "Angela Merkel", "PER")], ("PER", "LOC"))
    assert placed == [(0, 13, "PER")] and counts["unresolved"] == 0
    lost, counts = spans_of(text, [span(0, 5, "Berlin", "LOC")], ("PER", "LOC"))
    assert lost == [] and counts["unresolved"] == 1
    malformed = {"from_name": "ner", "value": {"start": 0, "end": 13, "text": "Angela Merkel", "labels": 5}}
    spans_found, counts = spans_of(text, [malformed], ("PER", "LOC"))
    assert spans_found == [] and counts["unresolved"] == 1
    spans_found, counts = spans_of(text, [{"from_name": "ner", "value": [0, 13]}], ("PER", "LOC"))
    assert spans_found == [] and counts["unresolved"] == 1
    # a region of no characters (a click without a drag) marks nothing: the task's other regions stay
    spans_found, counts = spans_of(text, [span(0, 13, "Angela Merkel", "PER"), span(22, 22, "", "LOC")], ("PER", "LOC"))
    assert spans_found == [(0, 13, "PER")] and (counts["empty"], counts["unresolved"]) == (1, 0)


def test_a_task_whose_region_label_the_control_no_longer_has_is_left_out_not_trained_as_no_entity(tmp_path, encoder):
    """A label renamed or removed in the config while annotations still carry it (Label Studio
    allows that), or a region drawn on another text: its entity must not teach the head that
    there is nothing there, nor be placed at a chance match of its words."""
    from ls_backend.labeling import plan_for
    from ls_backend.ner_job import token_data
    from ls_backend.store import CorrectionStore

    store = CorrectionStore(f"sqlite:///{tmp_path / 'store.sqlite'}")
    try:
        proj = project(7, config=NER_CONFIG)
        events = [(200, [span(0, 13, "Angela Merkel", "PER"), span(22, 28, "Berlin", "LOC")]),  # kept
                  (201, [span(0, 15, "Emmanuel Macron", "PERSON")]),  # a label the config no longer has
                  (202, [span(0, 13, "Angela Merkel", "PERSON"), span(22, 28, "Berlin", "LOC")]),
                  (203, [{"from_name": "ner", "to_name": "text", "type": "labels", "value": "Berlin"}]),  # malformed
                  (204, []),  # labeled, no entity: a negative
                  # drawn on a title when the control pointed at it: "Jordan" the person, not the country here
                  (205, [{**span(0, 6, "Jordan", "PER"), "to_name": "title"}])]
        texts = {200: "Angela Merkel visited Berlin.", 201: "Emmanuel Macron spoke.", 202: "Angela Merkel visited Berlin.",
                 203: "It rained in Berlin.", 204: "Nothing here.", 205: "The king of Jordan met Michael Jordan."}
        for n, (task, result) in enumerate(events):
            store.record_event(annotation_event(n + 1, task, result, text=texts[task], proj=proj))
        plan = plan_for(NER_CONFIG)
        splits = token_data(store, key_of(7), plan, {}, Settings(model_dir=tmp_path / "models", eval_share=0.0),
                            TrainingArguments(), encoder)
        kept = dict(zip(splits["ner"].train.task_ids, splits["ner"].train.spans))
        assert kept == {200: [(0, 13, "PER"), (22, 28, "LOC")], 204: []}
    finally:
        store.close()


def test_a_text_of_the_entity_slice_is_not_trained_on_under_another_tasks_id(tmp_path, encoder):
    from ls_backend.finetune import in_eval_slice
    from ls_backend.labeling import plan_for
    from ls_backend.ner_job import token_data
    from ls_backend.store import CorrectionStore

    settings = Settings(model_dir=tmp_path / "models")
    judged = next(t for t in range(1, 1000) if in_eval_slice(t, settings.eval_share))
    trained = [t for t in range(1000, 1100) if not in_eval_slice(t, settings.eval_share)][:2]
    store = CorrectionStore(f"sqlite:///{tmp_path / 'store.sqlite'}")
    try:
        proj = project(7, config=NER_CONFIG)
        texts = {judged: "Angela Merkel visited Berlin.", trained[0]: "Angela Merkel visited Berlin.",
                 trained[1]: "Emmanuel Macron spoke in Paris."}
        for n, (task, text) in enumerate(texts.items()):
            result = [span(0, 13, "Angela Merkel", "PER")] if "Merkel" in text else [span(0, 15, "Emmanuel Macron", "PER")]
            store.record_event(annotation_event(n + 1, task, result, text=text, proj=proj))
        splits = token_data(store, key_of(7), plan_for(NER_CONFIG), {}, settings, TrainingArguments(), encoder)
        assert splits["ner"].train.task_ids == [trained[1]] and splits["ner"].held.task_ids == [judged]
    finally:
        store.close()


def test_annotations_made_before_the_first_entity_are_not_ner_negatives(tmp_path):
    """A project labeled with Choices for a while, then given a Labels control: its earlier
    annotations say nothing about entities and must not teach the head that there are none."""
    from ls_backend.store import CorrectionStore

    store = CorrectionStore(f"sqlite:///{tmp_path / 'store.sqlite'}")
    try:
        proj = project(7, config=NER_AND_TOPIC_CONFIG)
        for n in range(5):  # before the Labels control existed
            store.record_event(annotation_event(n + 1, 100 + n, choices("World"), updated=100 + n,
                                                text=f"Angela Merkel visited Paris {n}", proj=proj))
        store.record_event(annotation_event(20, 200, [span(0, 13, "Angela Merkel", "PER")], updated=300,
                                            text="Angela Merkel met Bob", proj=proj))
        store.record_event(annotation_event(21, 201, choices("World"), updated=301, text="Nothing here", proj=proj))
        rows = store.annotation_results(key_of(7), "ner", include_empty="since_first")
        assert [task for task, _, _ in rows] == [200, 201]  # 201: labeled since, with no entity: a negative
        assert len(store.annotation_results(key_of(7), "ner", include_empty=True)) == 7
        # a region whose labels are not a list of names counts nothing and breaks nothing
        store.record_event(annotation_event(22, 202, [{"from_name": "ner", "to_name": "text", "type": "labels",
                                                       "value": {"start": 0, "end": 2, "text": "No", "labels": 5}}],
                                            updated=302, text="No entity", proj=proj))
        assert store.project_summary(key_of(7)).labels["ner"]["PER"] == 1
    finally:
        store.close()


def test_on_a_slice_without_entities_a_false_alarm_costs_a_share_not_the_whole_score():
    gold = [[] for _ in range(12)]
    nothing = span_scores(gold, [[] for _ in range(12)])
    one_alarm = span_scores(gold, [[(0, 3, "PER")]] + [[] for _ in range(11)])
    assert nothing["primary"] == 1.0 and one_alarm["primary"] == pytest.approx(11 / 12)
    assert one_alarm["f1"] == 0.0  # the entity-level figures are kept as they are
    # with entities in the slice, the primary figure is the micro F1
    assert span_scores([[(0, 3, "PER")], []], [[(0, 3, "PER")], [(1, 2, "PER")]])["primary"] == pytest.approx(2 / 3)


def test_an_ner_job_is_judged_against_a_version_promoted_while_it_trained(tmp_path):
    from ls_backend.finetune import FineTuneJob
    from ls_backend.store import CorrectionStore

    settings = Settings(model_dir=tmp_path / "models", max_length=MAX_LENGTH, train_max_length=MAX_LENGTH,
                        train_mode="frozen", eval_min=5)
    store = CorrectionStore.from_settings(settings)
    key = key_of(7)
    proj = project(7, config=NER_CONFIG)
    for n, sentence in enumerate(read_sentences(data_file("conll2003", "eng.train"), limit=60)):
        text, spans, _ = as_text(sentence, natural=True)
        result = [span(a, b, text[a:b], label) for a, b, label in spans if label in ("PER", "ORG", "LOC", "MISC")]
        store.record_event(annotation_event(n + 1, 100 + n, result, text=text, proj=proj))
    registry = ModelRegistry(settings.model_dir)
    try:
        first = FineTuneJob(settings, store).run(key)
        assert first["promoted"] and first["metrics"][first["recipe"]]["controls"]["ner"]["f1"] > 0
        untrained = registry.meta(key, first["version"])["parent"]
        registry.promote(key, untrained, reason="test: back to the untrained version")

        def promote_midway(update: dict) -> None:
            if update.get("stage") == "ner-frozen" and registry.current(key) != first["version"]:
                registry.promote(key, first["version"], reason="test: promoted while the job trains")

        second = FineTuneJob(settings, store, progress=promote_midway).run(key)
    finally:
        store.close()
    meta = registry.meta(key, second["version"])
    assert meta["parent"] == untrained and meta["decision"]["against"] == first["version"]
    # measured: the trained version's F1 on the slice, not the untrained start's 0
    assert meta["metrics"]["current"]["controls"]["ner"]["f1"] == pytest.approx(
        first["metrics"][first["recipe"]]["controls"]["ner"]["f1"], abs=1e-6)


def test_the_frozen_token_fit_samples_windows_beyond_its_token_cap_and_gold_is_read_as_tagged(encoder):
    from ls_backend.ner import as_tagged, capped_windows
    from ls_backend.spans import IGNORE

    windows_ = [([1, 2, 3, 4], [IGNORE, 0, 1, IGNORE]) for _ in range(10)]  # 2 tagged tokens each
    kept, sampled = capped_windows(windows_, 100, seed=0)
    assert kept == windows_ and not sampled
    kept, sampled = capped_windows(windows_, 7, seed=0)
    assert sampled and len(kept) == 3 and kept == capped_windows(windows_, 7, seed=0)[0]
    # evaluation reads gold spans as training tags them, so a model that learned the tags exactly
    # scores F1 1: trimmed of whitespace, widened to whole tokens, a dropped zero-width space left out
    texts = ["see Paris now", "Parisians love it", "visit Paris\u200b now"]
    gold = [[(3, 10, "LOC")], [(0, 5, "LOC")], [(6, 12, "LOC")]]
    tagged = as_tagged(encoder.tokenizer, texts, gold, ["LOC"])
    assert tagged[0] == [(4, 9, "LOC")] and tagged[2] == [(6, 11, "LOC")]
    (start, end, _), = tagged[1]
    assert start == 0 and texts[1][start:end] in ("Parisian", "Parisians")  # the token "Paris" was drawn in
