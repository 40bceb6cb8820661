"""Hugging Face integration: ready-made LightningModules and DataModules for fine-tuning.

:class:`CausalLMModule` / :class:`SequenceClassificationModule` wrap ``transformers`` models and
follow the package's batch contract (``sample_index``, per-sample losses);
:class:`SFTDataModule` / :class:`ClassificationDataModule` load local json/jsonl/csv/tsv/parquet
files with ``datasets`` and produce matching batches. All of them are configurable from
LightningCLI YAML. :func:`save_pretrained` (also ``module.save_pretrained(dir)``) writes a
model with its tokenizer; :func:`encode_prompt` gives the ids an SFT-trained model generates
from.
"""

from lightning_selmerge.hf.classification_data import ClassificationDataModule
from lightning_selmerge.hf.export import save_pretrained
from lightning_selmerge.hf.modules import CausalLMModule, SequenceClassificationModule
from lightning_selmerge.hf.preprocess import encode_prompt
from lightning_selmerge.hf.sft_data import SFTDataModule

__all__ = [
    "CausalLMModule",
    "ClassificationDataModule",
    "SFTDataModule",
    "SequenceClassificationModule",
    "encode_prompt",
    "save_pretrained",
]
