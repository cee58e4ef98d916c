"""Labels, headings, table headers and everyday title-case words are not people; real names next to them still
are. The position and vocabulary rules are tested on their own, then through presidio with the real spaCy model."""

from __future__ import annotations

import pytest

from slmigrate.curate.pii.evaluate import score
from slmigrate.curate.pii.false_positives import (all_everyday_words, in_label_position, names_organisation,
                                           not_a_person)


def _span(text: str, value: str) -> tuple[int, int]:
    start = text.index(value)
    return start, start + len(value)


@pytest.mark.parametrize("text,value", [
    ("**Flight Date:** 2024-05-28", "Flight Date"),
    ("- **New Flight Date:** May 24, 2024", "Flight Date"),
    ("- Payment Method: credit card", "Payment Method"),
    ("**Order Status:** delivered", "Order Status"),
    ("- **Passengers**: Aarav Ahmed", "Passengers"),
    ("## Booking Details\ntext", "Booking Details"),
    ("Booking Details\n---------------\ntext", "Booking Details"),
    ("| Flight Number | Status |\n|---|---|\n| HAT123 | landed |", "Flight Number"),
    ("Please see **Customer Support** below.", "Customer Support"),
])
def test_label_positions(text, value):
    assert in_label_position(text, *_span(text, value))
    assert not_a_person(text, *_span(text, value))


@pytest.mark.parametrize("text,value", [
    ("**Name:** John Smith", "John Smith"),
    ("Passenger: Mary Jones", "Mary Jones"),
    ("| John Smith | 2024 |", "John Smith"),  # a data row, not a header
    ("**John Smith:** hello there", "John Smith"),  # a speaker in bold: a listed first name
    ("Mehrudin shouted at Todd: what are you doing?", "Mehrudin"),  # a sentence before a colon, not a label
    ("Scott had given Belle his address: 975 Bay Street", "Belle"),  # a given name that is also a word
    ("Thanks, Hope Black, for calling.", "Hope Black"),  # words that are names too
])
def test_names_stay_names(text, value):
    assert not not_a_person(text, *_span(text, value))


def test_everyday_words_and_organisations():
    assert all_everyday_words("Water Bottle") and all_everyday_words("Airplane Mode")
    assert all_everyday_words("Date")  # a lone word only when it is a UI word
    assert not all_everyday_words("Discipline") and not all_everyday_words("Kevin Smith")
    text = "The Clark, Romero and Hall Orchestra was founded in 1973. Ask Anna Berg."
    assert names_organisation(text, *_span(text, "Clark"))
    assert names_organisation(text, *_span(text, "Hall Orchestra"))
    assert not names_organisation(text, *_span(text, "Anna Berg"))


def test_precision_and_recall_on_a_hand_made_corpus():
    rows = [
        {"full_text": "Anna Berg lives at 5 Elm St.",
         "spans": [{"entity_type": "PERSON", "entity_value": "Anna Berg", "start_position": 0, "end_position": 9},
                   {"entity_type": "STREET_ADDRESS", "entity_value": "5 Elm St", "start_position": 19,
                    "end_position": 27}]},
        {"full_text": "Call Bob at 555-0100, see Flight Date.",
         "spans": [{"entity_type": "PERSON", "entity_value": "Bob", "start_position": 5, "end_position": 8},
                   {"entity_type": "GPE", "entity_value": "x", "start_position": 26, "end_position": 32}]},
    ]
    predicted = [
        # partial overlap counts; a PERSON span on an address label does not
        [("PERSON", (0, 4)), ("PERSON", (19, 22)), ("STREET_ADDRESS", (19, 27))],
        # "Flight Date" overlaps only a label of another type: wrong; URL is no labelled type: not counted
        [("PERSON", (26, 37)), ("URL", (0, 4))],
    ]
    per = score(rows, predicted)
    assert per["PERSON"] == {"labelled": 2, "found": 1, "recall": 0.5, "predicted": 3, "precision": 0.333,
                             "missed_examples": ["Bob"]}
    assert (per["STREET_ADDRESS"]["recall"], per["STREET_ADDRESS"]["precision"]) == (1.0, 1.0)
    assert per["EMAIL_ADDRESS"]["precision"] is None and per["EMAIL_ADDRESS"]["recall"] is None


# --- through presidio and the real spaCy model ---
@pytest.fixture(scope="module")
def analyzer():
    from slmigrate.curate.pii import TextAnalyzer

    return TextAnalyzer()


def _persons(analyzer, text: str) -> list[str]:
    return [f.value for f in analyzer.analyze(text) if f.entity == "PERSON"]


@pytest.mark.slow
@pytest.mark.parametrize("text", [
    "**Flight Date:** 2024-05-28",
    "## Booking Details\nYour reservation is confirmed.",
    "| Flight Number | Status |\n|---|---|\n| HAT123 | landed |",
    "- **Payment Method:** Gift Card (Amount: $120)",
    "Please contact Customer Support for help.",
    "Turn off Airplane Mode and restart the phone.",
])
def test_no_person_in_labels_and_ui_words(analyzer, text):
    assert _persons(analyzer, text) == []


@pytest.mark.slow
@pytest.mark.parametrize("text,name", [
    ("**Name:** John Smith", "John Smith"),
    ("Passenger: Mary Jones", "Mary Jones"),
    ("### Reservation\n- **Passenger Name:** Anna Berg\n- **Cabin Class:** Economy", "Anna Berg"),
    ("Hi, I'm Emily Johnson and I want to change my flight.", "Emily Johnson"),
])
def test_names_next_to_labels_are_found(analyzer, text, name):
    assert name in _persons(analyzer, text)


@pytest.mark.slow
def test_a_label_is_not_replaced_in_a_scrubbed_call(analyzer):
    from slmigrate.curate.pii import CallScrubber
    from slmigrate.record import CallRecord

    text = "**Flight Date:** 2024-05-28\n**Passenger:** John Smith"
    call = CallRecord(request={"messages": [{"role": "assistant", "content": text}]})
    scrubbed, _ = CallScrubber(analyzer).scrub(call)
    content = scrubbed.request["messages"][0]["content"]
    assert content.startswith("**Flight Date:** 2024-05-28\n**Passenger:** ") and "John Smith" not in content
