"""Hugging Face integration: ready-made LightningModules and DataModules for fine-tuning.

:class:`CausalLMModule` / :class:`SequenceClassificationModule` wrap ``transformers`` models and
follow the package's batch contract (``sample_index``, per-sample losses);
:class:`SFTDataModule` / :class:`ClassificationDataModule` load local json/jsonl/csv/tsv/parquet
files with ``datasets`` and produce matching batches. All of them are configurable from
LightningCLI YAML. :func:`save_pretrained` (also ``module.save_pretrained(dir)``) writes a
model with its tokenizer.
"""

from lightning_selmerge.hf.data import ClassificationDataModule, SFTDataModule
from lightning_selmerge.hf.export import save_pretrained
from lightning_selmerge.hf.modules import CausalLMModule, SequenceClassificationModule

__all__ = [
    "CausalLMModule",
    "ClassificationDataModule",
    "SFTDataModule",
    "SequenceClassificationModule",
    "save_pretrained",
]
