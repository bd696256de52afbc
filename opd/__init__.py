"""opd: disaggregated on-policy distillation (CLI and shared helpers)."""

__version__ = "0.1.0"
