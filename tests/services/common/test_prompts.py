"""Prompt templates byte for byte as in the MMed-RAG release (facts file), and the chat template."""

from __future__ import annotations

import jinja2
import pytest

from services.common.answers import parse_yes_no
from services.common.prompts import (
    CHAT_TEMPLATE,
    build_chat_messages,
    build_prompt,
    build_report_prompt,
    build_vqa_prompt,
    format_references,
    render_conversation,
)

CAUTION = (
    "It should be noted that the diagnostic information in the reference reports cannot be directly used as "
    "the basis for diagnosis, but should only be used for reference and comparison."
)


def test_references_are_numbered_with_a_trailing_space_each() -> None:
    assert format_references(["A.", "B."]) == "1. A. 2. B. "


def test_vqa_with_retrieval_is_byte_exact() -> None:
    expected = (
        "You are provided with a chest X-ray image, a image-related question and 2 reference report(s): "
        "1. No effusion. 2. Small effusion. \n"
        "Please answer the question based on the image and report and choose from the following two options: "
        f"[yes, no]. {CAUTION} Question: Is there an effusion?"
    )
    assert (
        build_vqa_prompt("Is there an effusion?", "radiology", ["No effusion.", "Small effusion."])
        == expected
    )


@pytest.mark.parametrize(("domain", "noun"), [("ophthalmology", "fundus"), ("pathology", "pathology")])
def test_vqa_nouns_per_domain(domain: str, noun: str) -> None:
    assert build_vqa_prompt("Q?", domain, ["R."]).startswith(f"You are provided with a {noun} image, ")


def test_vqa_without_retrieval_is_byte_exact() -> None:
    assert build_vqa_prompt("Is the heart enlarged?", "radiology") == (
        "Is the heart enlarged? Please answer the question based on the image and choose from the following "
        "two options: [yes, no]."
    )


@pytest.mark.parametrize(
    ("domain", "role", "article_image"),
    [
        ("radiology", "radiologist", "an X-ray image"),
        ("ophthalmology", "ophthalmologist", "a fundus image"),
        ("pathology", "pathologist", "a pathology image"),
    ],
)
def test_report_with_retrieval_is_byte_exact(domain: str, role: str, article_image: str) -> None:
    expected = (
        f"You are a professional {role}. You are provided with {article_image} and 1 reference report(s): "
        "1. Normal. \n"
        f"Please generate a report based on the image. {CAUTION} "
        "Please only include the content of the report in your response."
    )
    assert build_report_prompt(domain, ["Normal."]) == expected


def test_report_without_retrieval_is_byte_exact() -> None:
    assert build_report_prompt("radiology") == (
        "You are a professional radiologist. Please generate a report based on the chest X-ray image and "
        "only include the content of the report in your response."
    )


def test_unknown_domain_and_missing_question_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown domain 'cardiology'"):
        build_report_prompt("cardiology")
    with pytest.raises(ValueError, match="needs a question"):
        build_prompt("vqa", "radiology")


def test_conversation_is_vicuna_v1() -> None:
    system = (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions."
    )
    assert render_conversation("Hi?") == f"{system} USER: <image>\nHi? ASSISTANT:"
    assert render_conversation("Hi?", "Yes.") == f"{system} USER: <image>\nHi? ASSISTANT: Yes.</s>"


@pytest.mark.parametrize("references", [(), ("One.",), ("One.", "Two.")])
def test_chat_template_renders_the_same_text_as_the_python_function(references: tuple[str, ...]) -> None:
    template = jinja2.Environment().from_string(CHAT_TEMPLATE)
    prompt = build_vqa_prompt("Is there a nodule?", "radiology", references)
    messages = build_chat_messages(prompt, "data:image/png;base64,AAAA")
    assert template.render(messages=messages, add_generation_prompt=True) == render_conversation(prompt)
    with_answer = [*messages, {"role": "assistant", "content": "No."}]
    assert template.render(messages=with_answer, add_generation_prompt=False) == render_conversation(
        prompt, "No."
    )


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("Yes.", "yes"),
        ("No", "no"),
        ("no, there is none.", "no"),
        ("There is not an effusion", "no"),
        ("Yes. No doubt.", "yes"),
        ("Nothing abnormal", "yes"),
        ("", "yes"),
    ],
)
def test_yes_no_parser_follows_the_mmed_rag_rule(text: str, answer: str) -> None:
    assert parse_yes_no(text) == answer
