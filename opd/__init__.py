"""opd: disaggregated on-policy distillation (CLI and shared helpers)."""

import os

__version__ = "0.1.0"

# transformers >= 5.25 swaps layers for kernels downloaded from the Hugging Face Hub at load time
# when the `kernels` package is installed (its own requirement): on a machine without network the
# load fails ("could not verify publisher trust status"), and elsewhere the code that runs depends on
# the Hub. opd loads models for training and scoring, so it turns that off unless the user asks
# for it (USE_HUB_KERNELS=YES).
os.environ.setdefault("USE_HUB_KERNELS", "NO")
