"""``mmedrag-client``: call a running MMed-RAG Serve from the shell and print answer and evidence."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from mmedrag_client.client import MMedRAGClient
from mmedrag_client.types import APIError, RAGResult


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmedrag-client", description="Call MMed-RAG Serve.")
    parser.add_argument(
        "--url", default=os.environ.get("MMEDRAG_URL", "http://127.0.0.1:8000"), help="Router URL."
    )
    parser.add_argument(
        "--api-key", default=os.environ.get("MMEDRAG_API_KEY"), help="API key, if auth is on."
    )
    parser.add_argument("--json", action="store_true", help="Print the whole response as JSON.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("vqa", "report"):
        command = sub.add_parser(name, help=f"POST /{name}")
        command.add_argument("--image", required=True, help="PNG, JPEG or DICOM file.")
        if name == "vqa":
            command.add_argument("--question", required=True, help="A yes/no question.")
        command.add_argument("--domain", choices=["radiology", "ophthalmology", "pathology"])
        command.add_argument("--retrieval", choices=["adaptive", "fixed", "off"])
        command.add_argument("--k-max", type=int)
        command.add_argument("--max-tokens", type=int)
    return parser


def _print(result: RAGResult) -> None:
    print(f"answer: {result.answer}")
    print(f"domain: {result.domain.label} ({result.domain.source})")
    print(f"retrieval: {result.retrieval.mode}, kept {result.retrieval.k} of {result.retrieval.k_max}")
    for item in result.evidence:
        mark = "*" if item.kept else " "
        print(f" {mark} {item.rank:>2}. [{item.score:.3f}] {item.text}")
    for warning in result.warnings:
        print(f"warning: {warning}")
    print(result.disclaimer)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    options = {
        "domain": args.domain,
        "retrieval": args.retrieval,
        "k_max": args.k_max,
        "max_tokens": args.max_tokens,
    }
    try:
        with MMedRAGClient(args.url, args.api_key) as client:
            if args.command == "vqa":
                result = client.vqa(args.image, args.question, **options)
            else:
                result = client.report(args.image, **options)
    except APIError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.__dict__, default=lambda o: o.__dict__, indent=2))
    else:
        _print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
