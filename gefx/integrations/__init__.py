"""Drop-in use of gefx in existing training code: Hugging Face Trainer subclasses (open-unlearning
contract: GEffectMixin, measured, measured_twins), plain loops (Recorder), and the reference code's G-effect
printout (ReferenceCompat)."""
from .compat import ReferenceCompat
from .hf import GEffectMixin, measured, measured_twins, preserved_rng, risk_of
from .records import Record, Recorder, read_records, save_records

__all__ = ["GEffectMixin", "measured", "measured_twins", "Record", "Recorder", "ReferenceCompat", "read_records", "save_records",
           "preserved_rng", "risk_of"]
