"""MMed-RAG prompt templates and the conversation wrapper, defined once for serving and training.

The texts are the method's constants, reproduced byte for byte from the MMed-RAG release (see
``../shared/reference/mmed-rag-facts.md``): the model has to see at serving time exactly what it saw
during preference tuning, so the router, the pair builder and the evaluator all call these functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

Task = Literal["vqa", "report"]

# Per-domain wording. The pathology phrases were not recovered from the release (facts file); these are
# the project's documented choice.
VQA_NOUN = {"radiology": "chest X-ray", "ophthalmology": "fundus", "pathology": "pathology"}
REPORT_ROLE = {"radiology": "radiologist", "ophthalmology": "ophthalmologist", "pathology": "pathologist"}
REPORT_ARTICLE_IMAGE = {
    "radiology": "an X-ray image",
    "ophthalmology": "a fundus image",
    "pathology": "a pathology image",
}

_CAUTION = (
    "It should be noted that the diagnostic information in the reference reports cannot be directly used "
    "as the basis for diagnosis, but should only be used for reference and comparison."
)
VQA_WITH_RETRIEVAL = (
    "You are provided with a {noun} image, a image-related question and {k} reference report(s): {refs}\n"
    "Please answer the question based on the image and report and choose from the following two options: "
    "[yes, no]. " + _CAUTION + " Question: {question}"
)
VQA_WITHOUT_RETRIEVAL = "{question} Please answer the question based on the image and choose from the following two options: [yes, no]."
REPORT_WITH_RETRIEVAL = (
    "You are a professional {role}. You are provided with {article_image} and {k} reference report(s): {refs}\n"
    "Please generate a report based on the image. " + _CAUTION + " Please only include the content of the "
    "report in your response."
)
REPORT_WITHOUT_RETRIEVAL = (
    "You are a professional {role}. Please generate a report based on the {noun} image and only include the "
    "content of the report in your response."
)

# LLaVA "vicuna_v1" conversation, as MMed-RAG trains and evaluates with it.
SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
USER_ROLE = "USER"
ASSISTANT_ROLE = "ASSISTANT"
TURN_SEPARATOR = " "
END_OF_ASSISTANT_TURN = "</s>"
IMAGE_TOKEN = "<image>"


def _check_domain(domain: str) -> None:
    if domain not in VQA_NOUN:
        raise ValueError(f"unknown domain {domain!r}; expected one of {', '.join(VQA_NOUN)}")


def format_references(reports: Sequence[str]) -> str:
    """Numbered concatenation of the kept reports: ``"1. {report} 2. {report} "`` (trailing space each)."""
    return "".join(f"{i}. {report} " for i, report in enumerate(reports, start=1))


def build_vqa_prompt(question: str, domain: str, references: Sequence[str] = ()) -> str:
    """The user text for a closed yes/no question; no references gives the no-retrieval template."""
    _check_domain(domain)
    if not references:
        return VQA_WITHOUT_RETRIEVAL.format(question=question)
    return VQA_WITH_RETRIEVAL.format(
        noun=VQA_NOUN[domain], k=len(references), refs=format_references(references), question=question
    )


def build_report_prompt(domain: str, references: Sequence[str] = ()) -> str:
    """The user text for report generation; no references gives the no-retrieval template."""
    _check_domain(domain)
    if not references:
        return REPORT_WITHOUT_RETRIEVAL.format(role=REPORT_ROLE[domain], noun=VQA_NOUN[domain])
    return REPORT_WITH_RETRIEVAL.format(
        role=REPORT_ROLE[domain],
        article_image=REPORT_ARTICLE_IMAGE[domain],
        k=len(references),
        refs=format_references(references),
    )


def build_prompt(task: Task, domain: str, references: Sequence[str] = (), question: str | None = None) -> str:
    """Dispatch on the task; a VQA prompt needs the question."""
    if task == "vqa":
        if question is None:
            raise ValueError("a VQA prompt needs a question")
        return build_vqa_prompt(question, domain, references)
    return build_report_prompt(domain, references)


def render_conversation(prompt: str, answer: str | None = None) -> str:
    """The vicuna_v1 text the language model reads: system, user turn with the image, assistant turn.

    Without ``answer`` it ends with ``"ASSISTANT:"`` (the generation prompt); with one it ends with the
    answer and ``</s>`` (a training target). ``chat_template.jinja`` in the model folder renders the same
    text from OpenAI-style messages (tested), so vLLM, our generator and the trainers agree.
    """
    text = f"{SYSTEM_PROMPT}{TURN_SEPARATOR}{USER_ROLE}: {IMAGE_TOKEN}\n{prompt}{TURN_SEPARATOR}{ASSISTANT_ROLE}:"
    if answer is not None:
        text += f" {answer}{END_OF_ASSISTANT_TURN}"
    return text


def build_chat_messages(prompt: str, image_url: str) -> list[dict]:
    """OpenAI chat messages for one image and one prompt, as the router sends them to vLLM."""
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_url}},
                {"type": "text", "text": prompt},
            ],
        }
    ]


# The chat template shipped in every generator folder (``chat_template.jinja``). It renders exactly
# ``render_conversation``: one user turn (image part(s) become "<image>\n", text parts follow) and, for a
# training target, the assistant turn. A leading system message replaces the default system prompt.
CHAT_TEMPLATE = (
    "{%- set system = namespace(text='" + SYSTEM_PROMPT.replace("'", "\\'") + "') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if message['content'] is string -%}{%- set system.text = message['content'] -%}"
    "{%- else -%}{%- set system.text = message['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join('') -%}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{- system.text -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- ' USER: ' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] in ['image', 'image_url'] -%}{{- '<image>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- ' ASSISTANT: ' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{{- message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') "
    "| join('') -}}{%- endif -%}"
    "{{- '</s>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- ' ASSISTANT:' -}}{%- endif -%}"
)
