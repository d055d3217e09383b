"""``mmedrag train retriever``: contrastive fine-tuning of a domain's CLIP-style retriever (open_clip).

- ``config.RetrieverTrainingConfig``: every setting, documented (the CLI's help comes from it).
- ``data``: image-report pairs from release files (``load_pairs``, ``medsynth_pairs``).
- ``model``: the dual encoder from a JSON model config (``load_model_config``, ``build_model``), with
  ``--text-model`` filling a Hugging Face text tower (a local folder, or ``minilm``).
- ``metrics``: Recall@k image→text and text→image over distinct texts (``paired_recalls``,
  ``evaluate_encoder``).
- ``trainer.RetrieverTrainer``: the training run; writes the artifact folder the retriever service loads.
- ``cli.retriever_cli``: the Typer command.

Submodules are imported on use, so importing this package costs nothing.
"""
